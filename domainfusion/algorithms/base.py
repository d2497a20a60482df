"""The algorithm contract the training loop relies on, and the registry algorithms add themselves to.

An algorithm is an `nn.Module` with `update(minibatches) -> dict[str, float]` (one optimisation step over a list
of per-domain `(x, y)` batches) and `predict(x) -> logits`; `checkpoint_stats()` adds run-level numbers (generated
images, pool refreshes) to each results.jsonl record. Algorithms that generate images also receive a `RunContext`:
the source training splits, the output folder and the run's shared LDM, which DomainBed's constructor cannot carry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from ..errors import UserError

if TYPE_CHECKING:
    from ..ldm import LatentDiffusion

Minibatches = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class RunContext:
    """What a generative algorithm needs beyond DomainBed's constructor arguments; the LDM loads on first use."""

    dataset: str
    output_dir: Path
    train_splits: list[Dataset]  # the in-splits of the training environments (never the held-out domains)
    train_env_names: list[str]
    env_names: list[str]  # every domain, held out or not (only to keep their names out of prompts)
    class_names: list[str]
    steps_per_epoch: float  # steps per pass over all source images (the unit of the augmentation period T)
    seed: int
    ldm_model: str = "embedded"  # 'embedded', a diffusers folder or a hub id
    data_dir: str = "data"
    prompt_template: str | None = None  # "{cls}" placeholder; None: the dataset's default
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    resume: bool = False  # reopen on-disk state (synthetic pools) restored from the checkpoint instead of rebuilding
    input_shape: tuple[int, int, int] | None = None  # the dataset's (C, H, W); checked against the LDM's resolution
    ldm_max_batch: int | None = None  # rows per VAE/UNet call (None: the LDM's default for its resolution)
    num_workers: int = 0  # loader processes reading the images handed to the LDM
    _ldm: LatentDiffusion | None = field(default=None, repr=False)

    @classmethod
    def for_data(
        cls,
        train_splits: Sequence[Dataset],
        class_names: Sequence[str],
        train_env_names: Sequence[str],
        *,
        output_dir: str | Path,
        batch_size: int,
        dataset: str = "ImageFolder",
        env_names: Sequence[str] | None = None,
        ldm_model: str = "embedded",
        seed: int = 0,
        device: str | torch.device = "cpu",
        prompt_template: str | None = None,
        data_dir: str = "data",
        resume: bool = False,
        input_shape: tuple[int, int, int] | None = None,
        ldm_max_batch: int | None = None,
        num_workers: int = 0,
    ) -> RunContext:
        """The one way to build a context, for `train` and for anyone training with their own loaders.

        `train_splits`: one Dataset of (image (C, H, W) in [0, 1], label) per source domain, the images the generator
        edits (never a held-out domain's). `batch_size` is per domain, as in `update`'s minibatches: with the split
        sizes it gives `steps_per_epoch`, the unit of the augmentation period. `dataset` picks the prompts (digit
        wording for the DigitsDG/MNIST family, descriptions of the folder names of PACS, OfficeHome and DomainNet;
        any other name gets "a photo of a {cls}" and describes a domain by its name). `env_names` (default: the
        sources) lists every domain, held out too, so that none of their names reaches a prompt. `input_shape`
        defaults to the first image's. `ldm_max_batch` bounds every LDM call's batch (GPU memory, `docs/sd_scale.md`).
        """
        env_names = list(train_env_names if env_names is None else env_names)
        if not train_splits or len(train_splits) != len(train_env_names):
            raise UserError(
                f"give one source domain name per training split: {len(train_splits)} split(s), "
                f"names {list(train_env_names)}"
            )
        if any(len(s) == 0 for s in train_splits):
            raise UserError(f"every source split needs images; sizes: {[len(s) for s in train_splits]}")
        if missing := [e for e in train_env_names if e not in env_names]:
            raise UserError(f"source domain(s) {missing} are not in env_names {env_names}")
        if not class_names:
            raise UserError("class_names is empty: the class prompts are built from them")
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        if ldm_max_batch is not None and ldm_max_batch < 1:
            raise UserError(f"ldm_max_batch must be at least 1, got {ldm_max_batch}")
        return cls(
            dataset=dataset,
            output_dir=Path(output_dir),
            train_splits=list(train_splits),
            train_env_names=list(train_env_names),
            env_names=env_names,
            class_names=list(class_names),
            steps_per_epoch=sum(len(s) for s in train_splits) / (batch_size * len(train_splits)),
            seed=seed,
            ldm_model=ldm_model,
            data_dir=data_dir,
            prompt_template=prompt_template,
            device=torch.device(device),
            resume=resume,
            input_shape=tuple(input_shape or train_splits[0][0][0].shape),
            ldm_max_batch=ldm_max_batch,
            num_workers=num_workers,
        )

    def ldm(self) -> LatentDiffusion:
        if self._ldm is None:
            from ..ldm import load_ldm
            from ..ldm.adapt import check_resolution

            ldm = load_ldm(self.ldm_model, self.device, max_batch=self.ldm_max_batch)
            if self.input_shape is not None:
                check_resolution(ldm.image_size, self.input_shape, self.ldm_model)
            self._ldm = ldm
        return self._ldm

    def class_prompts(self) -> list[str]:
        from ..ldm.adapt import default_prompt_template

        template = self.prompt_template or default_prompt_template(self.dataset)
        return [template.format(cls=c) for c in self.class_names]

    def source_domain_prompts(self) -> list[list[str]]:
        """Per class, one prompt per source domain that names the domain's look ('a sketch of a dog'). Only the
        training domains: the held-out domain's name must not reach the generator."""
        from ..ldm.adapt import domain_prompt

        return [[domain_prompt(self.dataset, env, c) for env in self.train_env_names] for c in self.class_names]

    def style_vocabulary_prompts(self) -> list[list[str]]:
        """Per class, the class prompt in each look of the LDM's style vocabulary (`adapt.style_vocabulary`: a fixed
        list, minus any phrase naming one of the dataset's domains)."""
        from ..ldm.adapt import style_prompt, style_vocabulary

        styles = style_vocabulary(self.dataset, self.env_names, self.ldm().style_vocabulary)
        return [[style_prompt(p, s) for s in styles] for p in self.class_prompts()]


class Algorithm(nn.Module):
    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        num_domains: int,
        hparams: dict,
        context: RunContext | None = None,
    ) -> None:
        super().__init__()
        self.hparams = hparams
        self.context = context

    def checkpoint_stats(self) -> dict[str, float]:
        """Run-level numbers for the next results.jsonl record (not averaged over steps like `update`'s)."""
        return {}

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
