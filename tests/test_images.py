"""The one image module: uint8 layouts, the channel→RGB map and its inverse, and grid column titles."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from domainfusion.images import from_rgb, to_rgb, to_uint8
from domainfusion.ldm.grids import GAP, TITLE_HEIGHT, save_grid


def test_to_uint8_rounds_clamps_and_moves_channels_last() -> None:
    x = torch.tensor([-0.5, 0.0, 0.5, 1 / 255 * 0.49, 1.0, 2.0]).view(1, 3, 1, 2)
    assert to_uint8(x).flatten().tolist() == [0, 0, 128, 0, 255, 255]
    images = torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    last = to_uint8(images, channels_last=True)
    assert last.shape == (2, 4, 5, 3) and last.is_contiguous()
    assert torch.equal(last, to_uint8(images).permute(0, 2, 3, 1))
    assert torch.equal(to_uint8(images[0], channels_last=True), last[0])  # (C, H, W) → (H, W, C)


@pytest.mark.parametrize("channels", [1, 2, 3])
def test_rgb_map_and_its_inverse(channels: int) -> None:
    x = torch.rand(2, channels, 4, 4, generator=torch.Generator().manual_seed(channels))
    rgb = to_rgb(x)
    assert rgb.shape == (2, 3, 4, 4)
    assert torch.equal(to_rgb(x[0]), rgb[0])  # a single (C, H, W) image maps the same way
    if channels == 1:
        assert all(torch.equal(rgb[:, i], x[:, 0]) for i in range(3))
    if channels == 2:
        assert torch.equal(rgb[:, :2], x) and torch.count_nonzero(rgb[:, 2]) == 0
    torch.testing.assert_close(from_rgb(rgb, channels), x)


def test_rgb_map_refuses_other_channel_counts() -> None:
    with pytest.raises(ValueError, match="expected 1, 2 or 3 image channels, got 4"):
        to_rgb(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="got 4"):
        from_rgb(torch.zeros(1, 3, 2, 2), 4)


def test_column_titles_sit_in_a_band_above_their_columns(tmp_path) -> None:
    rows = [torch.zeros(3, 3, 8, 8), torch.zeros(3, 3, 8, 8)]
    plain = Image.open(save_grid(rows, tmp_path / "plain.png"))
    titled = Image.open(save_grid(rows, tmp_path / "titled.png", column_titles=["a", "b", "c"]))
    assert plain.size == (3 * (16 + GAP) + GAP, 2 * (16 + GAP) + GAP)
    assert titled.size == (plain.size[0], plain.size[1] + TITLE_HEIGHT)
    band = torch.tensor(list(titled.convert("L").getdata())).view(titled.size[1], titled.size[0])[:TITLE_HEIGHT]
    inked = [int((band[:, GAP + c * (16 + GAP) : (c + 1) * (16 + GAP)] < 128).any()) for c in range(3)]
    assert inked == [1, 1, 1]  # each title is drawn over its own column
