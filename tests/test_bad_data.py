"""Image folders that used to train silently on wrong data: symlinked folders, hidden entries, 16-bit and
transparent images, a single class, decompression bombs (issue 21)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from domainfusion.data import get_dataset
from domainfusion.data.image_folder import load_image, to_rgb
from domainfusion.errors import UserError

from conftest import make_image_folder

HP = {"data_augmentation": False}


@pytest.fixture
def two_domains(tmp_path: Path) -> Path:
    """d0, d1 × classes a, b × three 8×8 PNGs: 12 images."""
    return make_image_folder(tmp_path / "ds", {d: ["a", "b"] for d in ("d0", "d1")}, per_class=3, size=8)


def _counts(root: Path) -> list[int]:
    return [len(env) for env in get_dataset("ImageFolder", root, [0], HP, image_size=8)]


def test_symlinked_folders_are_refused_and_symlinked_files_read(two_domains: Path, tmp_path: Path):
    assert _counts(two_domains) == [6, 6]
    outside = tmp_path / "elsewhere.png"
    Image.new("RGB", (8, 8), (9, 9, 9)).save(outside)
    (two_domains / "d0" / "a" / "linked.png").symlink_to(outside)  # a symlinked image file is data
    assert _counts(two_domains) == [7, 6]

    loop = two_domains / "d0" / "a" / "loop"
    loop.symlink_to(".")  # torchvision's walk followed it: 12 files became 252 samples, in both splits
    with pytest.raises(UserError, match=f"symlinked folder.*{loop}.*remove the links"):
        get_dataset("ImageFolder", two_domains, [0], HP)
    loop.unlink()
    up = two_domains / "d1" / "b" / "up"
    up.symlink_to("..")  # class-a images of d1 would have been labelled b
    with pytest.raises(UserError, match=f"symlinked folder.*{up}"):
        get_dataset("ImageFolder", two_domains, [0], HP)
    up.unlink()
    (two_domains / "d1" / "c").symlink_to(two_domains / "d1" / "a")  # a symlinked class folder is a folder too
    with pytest.raises(UserError, match=f"symlinked folder.*{two_domains / 'd1' / 'c'}"):
        get_dataset("ImageFolder", two_domains, [0], HP)


def test_hidden_entries_are_never_data(two_domains: Path):
    for hidden in ("d0/.ipynb_checkpoints", "d0/a/.cache", ".trash/a", ".trash/b"):
        (two_domains / hidden).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(two_domains / hidden / "0.png")
    Image.new("RGB", (8, 8)).save(two_domains / "d1" / "b" / ".hidden.png")
    (two_domains / "d1" / "b" / "._0.png").write_bytes(b"\0\5\26\7 macOS AppleDouble, not an image")
    ds = get_dataset("ImageFolder", two_domains, [0], HP, image_size=8)
    assert ds.environments == ["d0", "d1"] and ds.class_names == ["a", "b"]
    assert [len(env) for env in ds] == [6, 6]
    assert all("/." not in p for env in ds for p, _ in env.samples)


def test_sixteen_bit_greyscale_is_scaled_not_clipped(two_domains: Path):
    path = two_domains / "d0" / "a" / "deep.png"
    Image.fromarray(np.full((8, 8), 30000, np.uint16)).save(path)
    assert Image.open(path).mode == "I;16" and Image.open(path).convert("RGB").getpixel((0, 0)) == (255, 255, 255)
    expected = round(30000 * 255 / 65535)  # 116.7 → 117
    assert load_image(str(path)).getpixel((0, 0)) == (expected,) * 3
    assert to_rgb(Image.fromarray(np.full((2, 2), 30000, np.int32))).getpixel((0, 0)) == (expected,) * 3  # mode I
    ds = get_dataset("ImageFolder", two_domains, [0], HP, image_size=8)
    x, _ = ds[0][[p for p, _ in ds[0].samples].index(str(path))]
    assert x.shape == (3, 8, 8) and np.allclose(x.numpy(), expected / 255)


def test_transparency_is_composited_on_white(tmp_path: Path):
    a = 128 / 255  # half-transparent: out = colour·α + 255·(1 − α), rounded
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (8, 8), (200, 40, 0, 128)).save(rgba)
    expected = tuple(round(c * a + 255 * (1 - a)) for c in (200, 40, 0))
    assert expected == (227, 147, 127) and load_image(str(rgba)).getpixel((0, 0)) == expected
    la = tmp_path / "la.png"
    Image.new("LA", (8, 8), (100, 128)).save(la)
    assert load_image(str(la)).getpixel((0, 0)) == (177,) * 3 == (round(100 * a + 255 * (1 - a)),) * 3
    palette = tmp_path / "p.png"
    p = Image.new("P", (8, 8), 1)
    p.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    p.save(palette, transparency=1)  # index 1 (red) fully transparent
    assert Image.open(palette).convert("RGB").getpixel((0, 0)) == (200, 0, 0)  # what PIL alone gives
    assert load_image(str(palette)).getpixel((0, 0)) == (255, 255, 255)
    opaque = tmp_path / "opaque.png"
    Image.new("RGBA", (8, 8), (200, 40, 0, 255)).save(opaque)
    assert load_image(str(opaque)).getpixel((0, 0)) == (200, 40, 0)


def test_single_class_is_refused(tmp_path: Path):
    root = make_image_folder(tmp_path / "one", {"d0": ["a"], "d1": ["a"]}, per_class=2, size=8)
    with pytest.raises(UserError, match=f"{root} has one class folder \\(a\\).*at least 2 classes"):
        get_dataset("ImageFolder", root, [0], HP)


def test_decompression_bomb_is_a_bad_image(two_domains: Path, monkeypatch: pytest.MonkeyPatch):
    """PIL refuses images over 2 × MAX_IMAGE_PIXELS; lowering the limit lets a 32×32 PNG stand for a 20000² one."""
    bomb = two_domains / "d1" / "b" / "bomb.png"
    Image.new("RGB", (32, 32)).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 8×8 = 64 pixels pass, 32×32 = 1024 > 200 do not
    with pytest.raises(Image.DecompressionBombError):
        Image.open(bomb)
    with pytest.raises(UserError, match=f"cannot read 1 image\\(s\\): {bomb}: .*decompression bomb.*--skip-bad-images"):
        get_dataset("ImageFolder", two_domains, [0], HP)
    ds = get_dataset("ImageFolder", two_domains, [0], HP, image_size=8, skip_bad_images=True)
    assert ds.skipped_images == [str(bomb)] and [len(env) for env in ds] == [6, 6]
    with pytest.raises(UserError, match=f"cannot read image {bomb}"):
        load_image(str(bomb))
