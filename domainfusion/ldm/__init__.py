"""Latent diffusion models: one frozen LDM wrapper for Stable Diffusion folders and the embedded tiny LDM.

diffusers and transformers are imported on first use of `LatentDiffusion`/`load_ldm`, so ERM-only runs and the CLI's
help never pay for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .latent_diffusion import LatentDiffusion

__all__ = ["LatentDiffusion", "load_ldm"]


def __getattr__(name: str) -> Any:
    if name == "LatentDiffusion":
        from .latent_diffusion import LatentDiffusion

        return LatentDiffusion
    raise AttributeError(name)


def load_ldm(model: str, device: str | torch.device = "auto", max_batch: int | None = None) -> LatentDiffusion:
    """'embedded' = the shipped tiny LDM (materialised in the cache folder, `utils.cache_dir()`); otherwise a diffusers
    folder or hub id. `max_batch`: rows per VAE/UNet call (None: the model's default, `LatentDiffusion`)."""
    from .embedded import embedded_ldm_path
    from .latent_diffusion import LatentDiffusion

    path = embedded_ldm_path() if model == "embedded" else model
    return LatentDiffusion.from_pretrained(path, device=device, max_batch=max_batch)
