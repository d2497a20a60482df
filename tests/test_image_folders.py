"""Image-folder datasets (DomainBed layout, real PACS-mini), splits, loaders and the bad-input errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from domainfusion.data import get_dataset
from domainfusion.data.image_folder import image_problem
from domainfusion.data.loaders import InfiniteDataLoader, class_balanced_weights, split_dataset
from domainfusion.errors import UserError
from domainfusion.train import TrainArgs, train
from domainfusion.utils import seed_hash

HP = {"data_augmentation": False}


def test_real_pacs_mini_loads_with_consistent_class_indices(pacs_mini: Path):
    with pytest.raises(UserError, match="photo lacks \\['giraffe'\\].*--allow-missing-classes"):
        get_dataset("PACS", pacs_mini, [0], HP)
    ds = get_dataset("PACS", pacs_mini, [0], HP, allow_missing_classes=True, image_size=64)
    assert ds.environments == ["art_painting", "cartoon", "photo", "sketch"]
    assert ds.class_names == ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
    assert [len(d) for d in ds.datasets] == [10, 10, 10, 10]
    x, y = ds[2][0]
    assert x.shape == (3, 64, 64) and 0 <= x.min() and x.max() <= 1
    # every photo sample's label is the index of its folder's name in the global class list
    for path, label in ds[2].samples:
        assert ds.class_names[label] == Path(path).parent.name
    assert "giraffe" not in {Path(p).parent.name for p, _ in ds[2].samples}


def test_real_vlcs_mini_class_names_are_mapped(pacs_mini: Path):
    ds = get_dataset("ImageFolder", pacs_mini / "VLCS-mini", [0], HP, allow_missing_classes=True, image_size=32)
    assert ds.environments == ["caltech", "labelme", "sun"]
    assert ds.class_names == ["bird", "car", "chair", "dog", "person"]
    assert [len(d) for d in ds.datasets] == [55, 77, 55]
    assert "person" not in {Path(p).parent.name for p, _ in ds[1].samples}


def test_generic_image_folder_and_augmentation_only_on_train_envs(tiny_folder: Path):
    ds = get_dataset("ImageFolder", tiny_folder, [1], {"data_augmentation": True}, image_size=16)
    assert ds.num_classes == 2 and ds.input_shape == (3, 16, 16) and len(ds) == 3
    torch.manual_seed(0)
    a, b = ds[1][0][0], ds[1][0][0]
    assert torch.equal(a, b)  # test env: deterministic eval transform
    c, d = ds[0][0][0], ds[0][0][0]
    assert not torch.equal(c, d)  # training env: random augmentation


def test_split_is_seeded_like_domainbed():
    data = list(range(100))
    out, in_ = split_dataset(data, 20, seed_hash(0, 1))
    keys = list(range(100))
    np.random.RandomState(seed_hash(0, 1)).shuffle(keys)
    assert out.keys == keys[:20] and in_.keys == keys[20:]
    assert len(out) == 20 and len(in_) == 80 and set(out.keys).isdisjoint(in_.keys)
    assert seed_hash(0, 1) == 1514274641  # DomainBed's md5-based hash of "(0, 1)"
    again, _ = split_dataset(data, 20, seed_hash(0, 1))
    other, _ = split_dataset(data, 20, seed_hash(1, 1))
    assert again.keys == out.keys and other.keys != out.keys


def test_infinite_loader_small_split_and_class_balance():
    x = torch.arange(10).float().view(10, 1)
    y = torch.tensor([0] * 9 + [1])
    ds = torch.utils.data.TensorDataset(x, y)
    w = class_balanced_weights(ds)
    assert torch.allclose(w[:9], torch.full((9,), 1 / 18, dtype=torch.float64)) and w[9].item() == 0.5
    loader = iter(InfiniteDataLoader(ds, w, batch_size=32, num_workers=0, generator=torch.Generator().manual_seed(0)))
    labels = torch.cat([next(loader)[1] for _ in range(50)])
    assert len(labels) == 1600  # batches larger than the dataset keep coming
    assert abs(labels.float().mean().item() - 0.5) < 0.05


@pytest.mark.parametrize(
    "layout, match",
    [
        (None, "does not exist"),
        ({}, "no domain sub-folders"),
        ({"d0": ["a", "b"], "d1": ["a"]}, "d1 lacks \\['b'\\]"),
    ],
)
def test_folder_errors(tmp_path: Path, image_folder_factory, layout, match):
    root = tmp_path / "ds"
    if layout is not None:
        root.mkdir()
        image_folder_factory(root, layout, per_class=2)
    with pytest.raises(UserError, match=match):
        get_dataset("ImageFolder", root, [0], HP)


def test_empty_domain_and_unreadable_image(tiny_folder: Path):
    (tiny_folder / "d3" / "cat").mkdir(parents=True)
    with pytest.raises(UserError, match="d3 holds no images"):
        get_dataset("ImageFolder", tiny_folder, [0], HP)
    shutil.rmtree(tiny_folder / "d3")
    bad = tiny_folder / "d1" / "dog" / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(UserError, match="broken.png"):
        get_dataset("ImageFolder", tiny_folder, [0], HP)


def _truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_images_are_found_before_training(tiny_folder: Path):
    """A valid header with the data cut off opens fine; the check must still name the file, per format."""
    from PIL import Image

    png = tiny_folder / "d1" / "dog" / "0.png"
    jpg = tiny_folder / "d2" / "cat" / "photo.jpg"
    Image.open(tiny_folder / "d2" / "cat" / "0.png").convert("RGB").resize((64, 64)).save(jpg, quality=90)
    assert image_problem(str(png)) is None and image_problem(str(jpg)) is None
    _truncate(png)
    _truncate(jpg)
    with Image.open(png) as im:
        assert im.size == (16, 16)  # the header alone does not show the damage
    assert image_problem(str(png)) and image_problem(str(jpg))
    with pytest.raises(UserError, match=r"cannot read 2 image\(s\):.*0.png.*photo.jpg.*--skip-bad-images"):
        get_dataset("ImageFolder", tiny_folder, [0], HP)


def test_jpeg_with_trailing_bytes_after_its_end_marker_is_fine(tiny_folder: Path):
    from PIL import Image

    jpg = tiny_folder / "d0" / "cat" / "padded.jpg"
    Image.open(tiny_folder / "d0" / "cat" / "0.png").convert("RGB").save(jpg)
    jpg.write_bytes(jpg.read_bytes() + b"\0" * 100)
    assert image_problem(str(jpg)) is None


def test_skip_bad_images_drops_and_counts(tiny_folder: Path, tmp_path: Path):
    good = get_dataset("ImageFolder", tiny_folder, [0], HP)
    (tiny_folder / "d1" / "dog" / "broken.png").write_bytes(b"not a png")
    _truncate(tiny_folder / "d2" / "cat" / "3.png")
    ds = get_dataset("ImageFolder", tiny_folder, [0], HP, skip_bad_images=True)
    assert sorted(Path(p).name for p in ds.skipped_images) == ["3.png", "broken.png"]
    assert [len(e) for e in ds] == [len(good[0]), len(good[1]), len(good[2]) - 1]
    assert all(not p.endswith("cat/3.png") for p, _ in ds[2].samples) and ds[2].targets == [t for _, t in ds[2].samples]

    args = TrainArgs(
        dataset="ImageFolder",
        data_dir=str(tiny_folder),
        test_envs=[0],
        steps=2,
        checkpoint_freq=1,
        output_dir=str(tmp_path / "run"),
        skip_bad_images=True,
        progress=False,
        image_size=16,
        hparams='{"batch_size": 4}',
    )
    records = train(args)
    assert [r["skipped_images"] for r in records] == [2, 2]
    assert (tmp_path / "run" / "skipped_images.txt").read_text().count("\n") == 2


def test_test_env_out_of_range_lists_valid_ones(tiny_folder: Path, data_dir: Path):
    with pytest.raises(UserError, match="0=d0, 1=d1, 2=d2"):
        get_dataset("ImageFolder", tiny_folder, [3], HP)
    with pytest.raises(UserError, match="0=\\+90%, 1=\\+80%, 2=-90%"):
        get_dataset("ColoredMNIST", data_dir, [5], HP)
    with pytest.raises(UserError, match="leaves no training environment"):
        get_dataset("ImageFolder", tiny_folder, [0, 1, 2], HP)
    with pytest.raises(UserError, match="repeats an environment"):
        get_dataset("ImageFolder", tiny_folder, [1, 1], HP)
    with pytest.raises(UserError, match="known datasets: RotatedMNIST"):
        get_dataset("PACSS", data_dir, [0], HP)
