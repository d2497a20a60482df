"""DomainBed's data plumbing: seeded in/out holdout split, infinite training loaders, fast eval loaders.

A training loader's batches (indices and random augmentations) are a function of its generator's seed and the batch
number only, so they do not depend on `num_workers` and a resumed run continues with exactly the uninterrupted run's
batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, WeightedRandomSampler

from ..errors import UserError
from ..utils import seed_hash


class SplitDataset(Dataset):
    """A view of `dataset` restricted to `keys` (DomainBed's `_SplitDataset`)."""

    def __init__(self, dataset: Dataset, keys: Sequence[int]) -> None:
        self.underlying_dataset = dataset
        self.keys = list(keys)

    def __getitem__(self, key: int):
        return self.underlying_dataset[self.keys[key]]

    def __len__(self) -> int:
        return len(self.keys)


def split_dataset(dataset: Dataset, n: int, seed: int = 0) -> tuple[SplitDataset, SplitDataset]:
    """Return (first n of a seeded shuffle, the rest): DomainBed calls it as `out, in_ = split_dataset(...)`."""
    assert n <= len(dataset)
    keys = list(range(len(dataset)))
    np.random.RandomState(seed).shuffle(keys)
    return SplitDataset(dataset, keys[:n]), SplitDataset(dataset, keys[n:])


def holdout_split(
    env: Dataset, env_index: int, holdout_fraction: float, trial_seed: int, name: str = ""
) -> tuple[SplitDataset, SplitDataset]:
    """(out, in) of one environment exactly as a DomainBed run splits it: the first int(n · holdout_fraction) of a
    shuffle seeded by (trial_seed, env_index). Anything that must use "the run's in-split" (DSI's fine-tuning data)
    calls this, so it cannot drift from the training loop's split."""
    n_out = int(len(env) * holdout_fraction)
    if n_out == 0 or n_out == len(env):
        raise UserError(
            f"environment {env_index} ({name}) has {len(env)} images: too few to hold out "
            f"--holdout-fraction {holdout_fraction} and keep both splits non-empty"
        )
    return split_dataset(env, n_out, seed_hash(trial_seed, env_index))


def domain_of(splits: Sequence[Dataset], indices: torch.Tensor) -> torch.Tensor:
    """Which of `splits` each index into their concatenation falls in: the source domain of a generated image,
    whose provenance is such an index."""
    ends = torch.tensor([len(s) for s in splits]).cumsum(0)
    return torch.searchsorted(ends, indices, right=True)


def labels_of(dataset: Dataset) -> list[int]:
    """Labels without decoding images where the dataset allows it (TensorDataset, ImageFolder, splits)."""
    if isinstance(dataset, SplitDataset):
        base = labels_of(dataset.underlying_dataset)
        return [base[k] for k in dataset.keys]
    if hasattr(dataset, "tensors"):
        return dataset.tensors[1].tolist()
    if hasattr(dataset, "targets"):
        return list(dataset.targets)
    return [int(dataset[i][1]) for i in range(len(dataset))]


def class_balanced_weights(dataset: Dataset) -> torch.Tensor:
    """Per-sample weights 1/(n_classes_present · count(class)), as DomainBed's `make_weights_for_balanced_classes`."""
    labels = torch.tensor(labels_of(dataset))
    counts = torch.bincount(labels)
    present = (counts > 0).sum()
    return 1.0 / (counts[labels].double() * present)


class InfiniteDataLoader:
    """Endless stream of batches drawn with replacement (DomainBed's InfiniteDataLoader)."""

    def __init__(
        self,
        dataset: Dataset,
        weights: torch.Tensor | None,
        batch_size: int,
        num_workers: int,
        generator: torch.Generator,
        skip_batches: int = 0,
        rows: slice = slice(None),
    ) -> None:
        """`generator` (freshly seeded) draws the indices; its seed also seeds each image's random transforms.
        `skip_batches` fast-forwards the index stream (no image is loaded): a resumed run continues with exactly
        the batches an uninterrupted run would draw next. `rows` keeps a block of each drawn batch (only those
        images are loaded): data-parallel ranks share one stream and each trains on its block."""
        # One batch per sampler pass: with replacement this is DomainBed's distribution, and it also works when a
        # split holds fewer images than a batch (DomainBed's loader then spins forever).
        if weights is not None:
            sampler = WeightedRandomSampler(weights, replacement=True, num_samples=batch_size, generator=generator)
        else:
            sampler = RandomSampler(dataset, replacement=True, num_samples=batch_size, generator=generator)
        batch_sampler = BatchSampler(sampler, batch_size=batch_size, drop_last=True)
        for _ in range(skip_batches):
            for _ in batch_sampler:  # a whole pass, as _Forever consumes it, draws exactly one batch's randomness
                pass
        self._loader = DataLoader(
            SeededItems(dataset),
            num_workers=num_workers,
            batch_sampler=_Forever(batch_sampler, rows, generator.initial_seed(), skip_batches),
            persistent_workers=num_workers > 0,
        )
        self._iterator = iter(self._loader)

    def __iter__(self) -> Iterator:
        while True:
            yield next(self._iterator)


class _Forever:
    """The sampler's batches, endlessly, each index paired with the seed of its image's transforms: a hash of
    (loader seed, batch number, row), so the same image drawn twice is augmented differently."""

    def __init__(self, sampler: BatchSampler, rows: slice, seed: int, first_batch: int) -> None:
        self.sampler = sampler
        self.rows = rows
        self.seed = seed
        self.first_batch = first_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        number = self.first_batch
        while True:
            for batch in self.sampler:
                yield [(i, seed_hash(self.seed, number, row)) for row, i in enumerate(batch)][self.rows]
                number += 1


class SeededItems(Dataset):
    """`dataset[i]` with torch's global RNG seeded for that item (and restored after): random transforms
    (torchvision's draw from it) then depend on the item's seed only, not on the process that loads it or on
    what else drew from the RNG before (a worker's earlier images, the training step in the main process). Training
    loaders and the images handed to an LDM (`pool.subset_chunks`) read through it."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        with torch.random.fork_rng(devices=()):
            torch.manual_seed(seed)
            return self.dataset[index]


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int) -> DataLoader:
    """Sequential, non-shuffled loader for accuracy evaluation."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
