"""The algorithm contract the training loop relies on, and the registry algorithms add themselves to.

An algorithm is an `nn.Module` with `update(minibatches) -> dict[str, float]` (one optimisation step over a list
of per-domain `(x, y)` batches) and `predict(x) -> logits`. The training loop knows nothing else.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch
import torch.nn as nn

from ..errors import UserError

Minibatches = list[tuple[torch.Tensor, torch.Tensor]]


class Algorithm(nn.Module):
    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, num_domains: int, hparams: dict) -> None:
        super().__init__()
        self.hparams = hparams

    def update(self, minibatches: Minibatches) -> dict[str, float]:
        raise NotImplementedError

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


A = TypeVar("A", bound=type[Algorithm])
ALGORITHMS: dict[str, type[Algorithm]] = {}


def register(name: str) -> Callable[[A], A]:
    """Class decorator: `@register("ERM")` makes the algorithm available by name to train, sweep and the CLI."""

    def deco(cls: A) -> A:
        assert name not in ALGORITHMS, f"algorithm {name} registered twice"
        ALGORITHMS[name] = cls
        return cls

    return deco


def algorithm_class(name: str) -> type[Algorithm]:
    if name not in ALGORITHMS:
        raise UserError(f"unknown algorithm '{name}'; known algorithms: {', '.join(sorted(ALGORITHMS))}")
    return ALGORITHMS[name]
