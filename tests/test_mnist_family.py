"""RotatedMNIST / ColoredMNIST constructions checked numerically against DomainBed's recipe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from domainfusion.data import mnist as mnist_module
from domainfusion.data.mnist import ColoredMNIST, MultipleEnvironmentMNIST, load_all_mnist, rotate_images


def _orientation_degrees(img: np.ndarray) -> float:
    """Angle of the principal axis of an image's mass, in degrees counter-clockwise from the x axis."""
    ys, xs = np.nonzero(img > 0.2)
    w = img[ys, xs]
    x = xs - np.average(xs, weights=w)
    y = -(ys - np.average(ys, weights=w))  # image rows grow downwards
    cov = np.cov(np.stack([x, y]), aweights=w)
    vals, vecs = np.linalg.eigh(cov)
    vx, vy = vecs[:, np.argmax(vals)]
    return float(np.degrees(np.arctan2(vy, vx)) % 180)


@pytest.mark.parametrize("angle", [0, 15, 30, 45, 60, 75])
def test_rotation_angle_is_the_environment_angle(angle: int):
    bar = torch.zeros(1, 28, 28, dtype=torch.uint8)
    bar[0, 13:15, 4:24] = 255  # horizontal bar through the centre
    rotated = rotate_images(bar, angle)[0, 0].numpy()
    assert rotated.shape == (28, 28)
    assert abs(_orientation_degrees(rotated) - angle) < 1.5
    # mass is preserved up to interpolation at the border-free centre
    assert abs(rotated.sum() - bar.float().div(255).sum().item()) / rotated.sum() < 0.05


def test_all_mnist_is_70k_in_torchvision_order(data_dir):
    images, labels = load_all_mnist(data_dir)
    assert images.shape == (70000, 28, 28) and images.dtype == torch.uint8
    # first training digits of MNIST are 5 0 4 1 9 2 1 3 1 4; first test digits 7 2 1 0 4 1 4 9 5 9
    assert labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert labels[60000:60010].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert int(images[0, 5, 13]) == 18 and int(images.max()) == 255
    assert np.bincount(labels.numpy()).tolist()[1] == 6742 + 1135


def test_environments_get_round_robin_slices_of_a_seeded_shuffle(monkeypatch):
    images = torch.arange(60, dtype=torch.uint8).view(60, 1, 1).expand(60, 28, 28).clone()
    labels = torch.arange(60)
    monkeypatch.setattr(mnist_module, "load_all_mnist", lambda root: (images, labels))
    keep = lambda im, lab, env: (lab, env)  # noqa: E731

    torch.manual_seed(0)
    ds = MultipleEnvironmentMNIST("unused", ["a", "b", "c"], keep, (1, 28, 28), 10)
    torch.manual_seed(0)
    perm = torch.randperm(60)
    for i, (lab, env) in enumerate(ds.datasets):
        assert env == "abc"[i]
        assert lab.tolist() == perm[i::3].tolist()
    torch.manual_seed(1)
    other = MultipleEnvironmentMNIST("unused", ["a", "b", "c"], keep, (1, 28, 28), 10)
    assert other.datasets[0][0].tolist() != ds.datasets[0][0].tolist()


def test_colored_mnist_statistics(data_dir):
    torch.manual_seed(0)
    ds = ColoredMNIST(data_dir, [0], {})
    _, digits = load_all_mnist(data_dir)
    torch.manual_seed(0)
    digits = digits[torch.randperm(70000)]
    assert ds.num_classes == 2 and ds.input_shape == (2, 28, 28)
    for i, e in enumerate([0.1, 0.2, 0.9]):
        x, y = ds[i].tensors
        assert x.shape == (70000 // 3 + (i < 70000 % 3), 2, 28, 28)
        # exactly one channel carries the digit
        energy = x.sum(dim=(2, 3))
        assert ((energy[:, 0] == 0) | (energy[:, 1] == 0)).all()
        color = (energy[:, 1] > 0).long()  # channel 1 kept ⇔ colour 1
        clean = (digits[i::3] < 5).long()
        noise = (y != clean).float().mean().item()
        flip = (color != y).float().mean().item()
        n = len(y)
        assert abs(noise - 0.25) < 4 * np.sqrt(0.25 * 0.75 / n)
        assert abs(flip - e) < 4 * np.sqrt(e * (1 - e) / n)
        assert 0.0 <= x.min().item() and x.max().item() == 1.0
