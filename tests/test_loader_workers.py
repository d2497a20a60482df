"""Training batches are the same whatever `num_workers`, random augmentations included, and a loader fast-forwarded
for a resume continues with the uninterrupted run's batches: results must not depend on the worker count, and a
resumed run must train on the images (and augmentations) it would have seen."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset
from torchvision import transforms

from domainfusion.data.loaders import InfiniteDataLoader, class_balanced_weights

pytestmark = pytest.mark.usefixtures("one_thread")
BATCH = 4


class Images(Dataset):
    """12 distinct 3x8x8 images (image i is constant i / 12), labels i % 3, through `transform`."""

    def __init__(self, transform=None) -> None:
        self.transform = transform

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = torch.full((3, 8, 8), i / 12)
        x[:, :, 0] = 1.0  # a bright left column, so a flip shows
        return (x if self.transform is None else self.transform(x)), i % 3


# torchvision's random transforms draw from torch's global RNG, as DomainBed's augmentation does.
AUGMENT = transforms.Compose(
    [
        transforms.RandomHorizontalFlip(),
        transforms.RandomResizedCrop(8, scale=(0.5, 1.0)),
        transforms.ColorJitter(0.5, 0.5),
    ]
)


def batches(
    dataset: Dataset,
    num_workers: int,
    n: int = 6,
    skip: int = 0,
    seed: int = 0,
    weights: torch.Tensor | None = None,
    model_draws: bool = False,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` batches of a loader built as `train` builds one; `model_draws`: draw from the global RNG between
    batches, as a training step (dropout, pool sampling) does."""
    torch.manual_seed(123)
    loader = InfiniteDataLoader(
        dataset, weights, BATCH, num_workers, torch.Generator().manual_seed(seed), skip_batches=skip
    )
    it, out = iter(loader), []
    for _ in range(n):
        out.append(next(it))
        if model_draws:
            torch.rand(7)
    return out


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


def test_plain_batches_are_the_same_with_workers_and_after_a_fast_forward():
    plain = batches(Images(), 0)
    # The seeded stream, drawn by hand: each pass of the sampler is one torch.randint(12, (4,)) of the generator.
    g = torch.Generator().manual_seed(0)
    expected = [torch.randint(12, (BATCH,), generator=g) for _ in range(6)]
    assert [y.tolist() for _, y in plain] == [(i % 3).tolist() for i in expected]
    assert [x[:, 0, 0, 1].tolist() for x, _ in plain] == [(i / 12).tolist() for i in expected]
    assert_same(batches(Images(), 2), plain)
    assert_same(batches(Images(), 2, n=2, skip=4), plain[4:])


def test_augmented_batches_are_the_same_with_workers_and_after_a_fast_forward():
    reference = batches(Images(AUGMENT), 0)
    plain = batches(Images(), 0)
    # The augmentation is active (images change, labels do not), and an image drawn twice is augmented twice.
    assert [y.tolist() for _, y in reference] == [y.tolist() for _, y in plain]
    assert all(not torch.equal(xa, xp) for (xa, _), (xp, _) in zip(reference, plain))
    images, plain_images = torch.cat([x for x, _ in reference]), torch.cat([x for x, _ in plain])
    first, again = next(
        (i, j)
        for i in range(len(images))
        for j in range(i + 1, len(images))
        if torch.equal(plain_images[i], plain_images[j])
    )
    assert not torch.equal(images[first], images[again])
    # Nothing else decides the augmentations: not the worker count, not the training step's own random draws,
    # not a resume (fast-forward), with or without class-balanced sampling.
    assert_same(batches(Images(AUGMENT), 2), reference)
    assert_same(batches(Images(AUGMENT), 0, model_draws=True), reference)
    assert_same(batches(Images(AUGMENT), 0, n=2, skip=4), reference[4:])
    assert_same(batches(Images(AUGMENT), 2, n=2, skip=4, model_draws=True), reference[4:])
    weights = class_balanced_weights(Images())
    balanced = batches(Images(AUGMENT), 0, weights=weights)
    assert_same(batches(Images(AUGMENT), 2, n=3, skip=3, weights=weights), balanced[3:])
