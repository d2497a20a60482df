"""Image conversions shared by every layer that stores or shows images.

Images are float in [0, 1] with channels at dim -3, as classifiers see them. Stored pixels (pools, LDM training
images, grids) are uint8 in [0, 255]. A dataset's images have 1 channel (grey), 2 (ColoredMNIST's red and green) or
3 (RGB); an LDM and a person look at RGB, so `to_rgb` and `from_rgb` move between the two.
"""

from __future__ import annotations

import torch


def to_uint8(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """Float images in [0, 1] as uint8 on the CPU: how pools, caches and grids store pixels. `channels_last` moves
    the channels from dim -3 to the end ((C, H, W) → (H, W, C), (B, C, H, W) → (B, H, W, C)), the layout PIL and
    the LDM trainer's image store use."""
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    return pixels.movedim(-3, -1).contiguous() if channels_last else pixels


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """(..., C, H, W) with C in {1, 2, 3} → (..., 3, H, W): 1 channel is grey, 2 channels are red and green."""
    channels = images.shape[-3]
    if channels == 1:
        return images.expand(*images.shape[:-3], 3, *images.shape[-2:])
    if channels == 2:
        return torch.cat([images, torch.zeros_like(images[..., :1, :, :])], dim=-3)
    if channels != 3:
        raise ValueError(f"expected 1, 2 or 3 image channels, got {channels}")
    return images


def from_rgb(images: torch.Tensor, channels: int) -> torch.Tensor:
    """The inverse of `to_rgb`: (..., 3, H, W) → (..., `channels`, H, W), grey = channel mean, red/green kept."""
    if channels == 1:
        return images.mean(dim=-3, keepdim=True)
    if channels == 2:
        return images[..., :2, :, :]
    if channels != 3:
        raise ValueError(f"expected 1, 2 or 3 image channels, got {channels}")
    return images
