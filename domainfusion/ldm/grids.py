"""PNG grids of what an LDM generates, so a person can judge it at a glance (training progress, img2img strength).

Plain PIL tiling with a text label per row and a title per column: no matplotlib figure per call, so grids are cheap
enough to write every few hundred training steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image, ImageDraw, ImageFont

from ..images import to_uint8

if TYPE_CHECKING:
    from .latent_diffusion import LatentDiffusion


GAP = 2
LABEL_WIDTH = 200
TITLE_HEIGHT = 14  # the band above the cells that holds the column titles, when there are any


def save_grid(
    rows: Sequence[torch.Tensor],
    out_png: str | Path,
    row_labels: Sequence[str] = (),
    scale: int = 2,
    column_titles: Sequence[str] = (),
) -> Path:
    """Tile rows of (N, 3, H, W) images in [0, 1] into one PNG (nearest-neighbour ×`scale`), labels at the left,
    each column title centred above its column (cut to the column's width)."""
    cells = [[_enlarged(im, scale) for im in row] for row in rows]
    w, h = cells[0][0].size
    left = LABEL_WIDTH if row_labels else 0
    top = TITLE_HEIGHT if column_titles else 0
    n_cols = max(len(r) for r in cells)
    canvas = Image.new("RGB", (left + n_cols * (w + GAP) + GAP, top + len(cells) * (h + GAP) + GAP), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for c, title in enumerate(column_titles):
        while len(title) > 1 and draw.textlength(title, font=font) > w:
            title = title[:-1]
        x = left + GAP + c * (w + GAP) + (w - draw.textlength(title, font=font)) / 2
        draw.text((x, 1), title, fill="black", font=font)
    for r, row in enumerate(cells):
        y = top + GAP + r * (h + GAP)
        for c, cell in enumerate(row):
            canvas.paste(cell, (left + GAP + c * (w + GAP), y))
        if r < len(row_labels):
            draw.text((4, y + h // 2 - 6), row_labels[r][-34:], fill="black", font=font)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_png)
    return out_png


def _enlarged(image: torch.Tensor, scale: int) -> Image.Image:
    """One (3, H, W) image in [0, 1] as a PIL image ×`scale`, nearest-neighbour so single pixels stay visible."""
    height, width = image.shape[1:]
    return Image.fromarray(to_uint8(image, channels_last=True).numpy()).resize(
        (width * scale, height * scale), Image.Resampling.NEAREST
    )


def sample_grid(
    ldm: LatentDiffusion,
    prompts: Sequence[str],
    out_png: str | Path,
    n_seeds: int = 4,
    num_inference_steps: int = 25,
    guidance_scale: float = 1.0,
    seed: int = 0,
) -> Path:
    """Text-to-image grid: rows = prompts, columns = `n_seeds` seeds (image (r, c) is seeded seed + r·n_seeds + c)."""
    flat = [p for p in prompts for _ in range(n_seeds)]
    images = ldm.sample(flat, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed)
    return save_grid(list(images.split(n_seeds)), out_png, row_labels=list(prompts))


def img2img_grid(
    ldm: LatentDiffusion,
    images: torch.Tensor,
    prompts: Sequence[str],
    strengths: Sequence[float],
    out_png: str | Path,
    num_inference_steps: int = 25,
    guidance_scale: float = 1.0,
    seed: int = 0,
) -> Path:
    """SDEdit grid: rows = input images, columns = the input, then img2img at each strength (same seed per row)."""
    columns = [images.float()] + [
        ldm.img2img(
            images,
            list(prompts),
            strength=s,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            seed=seed,
        )
        for s in strengths
    ]
    rows = [torch.stack([col[i] for col in columns]) for i in range(len(images))]
    return save_grid(rows, out_png, row_labels=list(prompts))
