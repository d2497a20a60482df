"""Image conversions shared by every layer that stores or shows images."""

from __future__ import annotations

import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] (any layout) as uint8 on the CPU: how pools, caches and grids store pixels."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
