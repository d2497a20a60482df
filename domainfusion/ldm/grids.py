"""PNG grids of what an LDM generates, so a person can judge it at a glance (training progress, img2img strength).

Plain PIL tiling with a text label per row: no matplotlib figure per call, so grids are cheap enough to write every
few hundred training steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from .latent_diffusion import LatentDiffusion


GAP = 2
LABEL_WIDTH = 200


def save_grid(rows: Sequence[torch.Tensor], out_png: str | Path, row_labels: Sequence[str] = (),
              scale: int = 2) -> Path:
    """Tile rows of (N, 3, H, W) images in [0, 1] into one PNG (nearest-neighbour ×`scale`), labels at the left."""
    cells = [[np.asarray(Image.fromarray(_to_uint8(im)).resize((im.shape[2] * scale, im.shape[1] * scale),
                                                                Image.Resampling.NEAREST)) for im in row]
             for row in rows]  # fmt: skip
    h, w = cells[0][0].shape[:2]
    left = LABEL_WIDTH if row_labels else 0
    n_cols = max(len(r) for r in cells)
    canvas = Image.new("RGB", (left + n_cols * (w + GAP) + GAP, len(cells) * (h + GAP) + GAP), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for r, row in enumerate(cells):
        top = GAP + r * (h + GAP)
        for c, cell in enumerate(row):
            canvas.paste(Image.fromarray(cell), (left + GAP + c * (w + GAP), top))
        if r < len(row_labels):
            draw.text((4, top + h // 2 - 6), row_labels[r][-34:], fill="black", font=font)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_png)
    return out_png


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def sample_grid(ldm: LatentDiffusion, prompts: Sequence[str], out_png: str | Path, n_seeds: int = 4,
                num_inference_steps: int = 25, guidance_scale: float = 1.0, seed: int = 0) -> Path:
    """Text-to-image grid: rows = prompts, columns = `n_seeds` seeds (image (r, c) is seeded seed + r·n_seeds + c)."""
    flat = [p for p in prompts for _ in range(n_seeds)]
    images = ldm.sample(flat, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed)
    return save_grid(list(images.split(n_seeds)), out_png, row_labels=list(prompts))


def img2img_grid(ldm: LatentDiffusion, images: torch.Tensor, prompts: Sequence[str], strengths: Sequence[float],
                 out_png: str | Path, num_inference_steps: int = 25, guidance_scale: float = 1.0,
                 seed: int = 0) -> Path:
    """SDEdit grid: rows = input images, columns = the input, then img2img at each strength (same seed per row)."""
    columns = [images.float()] + [
        ldm.img2img(images, list(prompts), strength=s, num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale, seed=seed) for s in strengths
    ]  # fmt: skip
    rows = [torch.stack([col[i] for col in columns]) for i in range(len(images))]
    return save_grid(rows, out_png, row_labels=list(prompts))
