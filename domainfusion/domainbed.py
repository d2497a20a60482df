"""DomainFusion inside an existing DomainBed checkout: an algorithm class with DomainBed's constructor.

DomainBed builds an algorithm from (input_shape, num_classes, num_domains, hparams) alone, which cannot carry what
the generator needs: the source images it edits, where its pool lives, the class and domain names its prompts use.
DomainBed's train.py hands them over once with `set_run(...)` before it builds the algorithm; the class builds its
`RunContext` from them (docs/domainbed.md shows the three edits to a checkout).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from .algorithms import RunContext, algorithm_class
from .algorithms.base import Minibatches
from .errors import UserError
from .hparams import HParam, specs
from .models.networks import IMAGENET_MEAN, IMAGENET_STD

# The Normalize of DomainBed's image-folder transforms; its MNIST-family images are plain [0, 1] pixels.
IMAGENET = (IMAGENET_MEAN, IMAGENET_STD)

_run: dict[str, Any] | None = None


def set_run(
    train_splits: Sequence[Dataset],
    class_names: Sequence[str],
    train_env_names: Sequence[str],
    *,
    output_dir: str | Path,
    normalization: tuple[Sequence[float], Sequence[float]] | None = None,
    pretrained: str | None = None,
    **context: Any,
) -> None:
    """Record this process's run for the next `DomainFusion(...)`: DomainBed's source in-splits and names, its
    output folder, and `normalization` = the (mean, std) its transforms applied (`IMAGENET` for image folders), which
    the class undoes because the generator edits and stores [0, 1] pixels. `pretrained` is the ResNet's start, as
    `--pretrained` ("imagenet" for DomainBed's ResNet-50; None for the small-image CNN). Other keywords go to
    `RunContext.for_data` (dataset, env_names, ldm_model, seed; device defaults to DomainBed's: CUDA when available)."""
    global _run
    context.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
    _run = dict(
        train_splits=list(train_splits),
        class_names=list(class_names),
        train_env_names=list(train_env_names),
        output_dir=output_dir,
        normalization=normalization,
        pretrained=pretrained,
        **context,
    )


def extra_hparams(algorithm: str, dataset: str) -> list[HParam]:
    """Our hparams that DomainBed's registry lacks for `algorithm`: all but the block every algorithm shares, which
    DomainBed registers itself (with the same values)."""
    shared = specs("ERM", dataset)
    return [spec for name, spec in specs(algorithm, dataset).items() if name not in shared]


class _Pixels(Dataset):
    """A normalised dataset seen as [0, 1] pixels."""

    def __init__(self, data: Dataset, pixels: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.data, self.pixels = data, pixels

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        x, y = self.data[index]
        return self.pixels(x), y


class DomainFusion(nn.Module):
    """DomainBed's algorithm contract around ours: `update(minibatches, unlabeled=None)` and `predict(x)` on
    DomainBed's (normalised) inputs. A subclass with another `ALGORITHM` runs an ablation or baseline the same way
    ("DomainFusion_Aug", "CDGA", ...)."""

    ALGORITHM = "DomainFusion"

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, num_domains: int, hparams: dict) -> None:
        super().__init__()
        if _run is None:
            raise UserError(
                f"{self.ALGORITHM} needs the run's source images: call domainfusion.domainbed.set_run(...) "
                "in DomainBed's train.py before it builds the algorithm (docs/domainbed.md)"
            )
        run = dict(_run)
        if len(run["train_splits"]) != num_domains:
            raise UserError(
                f"set_run was given {len(run['train_splits'])} source split(s), DomainBed trains on "
                f"{num_domains} domain(s): pass the in-splits of exactly the training environments"
            )
        channels, pretrained = input_shape[0], run.pop("pretrained")
        mean, std = run.pop("normalization") or ((0.0,) * channels, (1.0,) * channels)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1), persistent=False)
        run["train_splits"] = [_Pixels(s, self.pixels) for s in run["train_splits"]]
        context = RunContext.for_data(**run, batch_size=hparams["batch_size"], input_shape=tuple(input_shape))
        self.hparams = hparams
        self.algorithm = algorithm_class(self.ALGORITHM)(
            tuple(input_shape), num_classes, num_domains, hparams, pretrained=pretrained, context=context
        )

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean

    def update(self, minibatches: Minibatches, unlabeled: list[torch.Tensor] | None = None) -> dict[str, float]:
        if unlabeled is not None:
            raise UserError(
                f"{self.ALGORITHM} is a domain generalization method: run DomainBed with --task domain_generalization"
            )
        return self.algorithm.update([(self.pixels(x), y) for x, y in minibatches])

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.algorithm.predict(self.pixels(x))
