"""Latent diffusion models: one frozen LDM wrapper for Stable Diffusion folders and the embedded tiny LDM."""

from domainfusion.ldm.latent_diffusion import LatentDiffusion

__all__ = ["LatentDiffusion"]
