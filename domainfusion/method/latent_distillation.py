"""Latent Distillation (method.md §1): the frozen LDM's class-conditional density as a gradient prior on θ.

For a source image x₀ in [0, 1] with label y, step by step:
1. Pseudo generation: c = softmax(f_θ(x₀))_y, the confidence in the *true* class; x(θ) = c · x₀ (a low-confidence
   image is dark and low-contrast).
2. Gradient distillation: z = E(x(θ)) (VAE posterior mean, graph kept), t ~ U{t_min·T, …, t_max·T}, ε ~ N(0, I),
   z_t = √ᾱ_t z + √(1−ᾱ_t) ε, ε̂ = ε_φ(z_t; prompt(y), t) from the frozen UNet (class prompt embedding cached).
3. The loss, built from ε̂ − r, reaches θ only through c. The reference r is the drawn noise ε (method.md; default
   `ld_reference="noise"`) or the UNet's unconditional prediction ε̂_∅ ("uncond": classifier score distillation,
   Yu et al. 2023 — the implicit classifier ∇ log p(y | z) instead of the density ∇ log p(z | y); with the embedded
   LDM the density rewards dark images whatever the class, see docs/method.md):
   - "sds" (default, as DreamFusion): the UNet runs without grad, g = w(t)(ε̂ − r), L = ½‖z − sg(z − g)‖² / B, so
     ∂L/∂z_i = g_i / B exactly, with no UNet backward pass;
   - "full" (ablation): L = ½ Σ_i w(t_i)(‖ε̂_i − ε_i‖² − ‖ε̂_∅,i − ε_i‖²) / B, the second term only for "uncond"
     (there L estimates −log p(y | z) as a diffusion classifier does), backpropagated through the UNet and the VAE.
   w(t) = 1 − ᾱ_t ("sds") or 1 ("uniform"). ‖·‖² sums over latent elements, as written in method.md.

What it must not do: update the LDM (its parameters are frozen and outside the classifier's optimiser) or run the
classifier again (the caller passes the logits of the CE forward pass, so LD costs one VAE encode + one UNet call).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..ldm.adapt import to_ldm_images

if TYPE_CHECKING:
    from ..ldm.latent_diffusion import LatentDiffusion

GRAD_FORMS = ("sds", "full")
WEIGHTINGS = ("sds", "uniform")
REFERENCES = ("noise", "uncond")


@dataclass(frozen=True)
class LDSettings:
    """The [decision] knobs of method.md §1; every one is an hparam (`ld_*`) in the registry, which holds the
    defaults."""

    weight: float  # λ_LD
    batch_size: int  # LD sub-batch: source images distilled per step
    t_min: float  # fractions of the number of training timesteps T
    t_max: float
    weighting: str  # "sds" (1 − ᾱ_t) or "uniform"
    grad: str  # "sds" or "full"
    guidance: float
    reference: str  # "noise" (ε, method.md) or "uncond" (ε̂_∅, classifier score distillation)

    @classmethod
    def from_hparams(cls, hp: dict) -> "LDSettings":
        return cls(hp["ld_weight"], hp["ld_batch_size"], hp["ld_t_min"], hp["ld_t_max"], hp["ld_weighting"],
                   hp["ld_grad"], hp["ld_guidance"], hp["ld_reference"])


@dataclass
class LDOutput:
    loss: torch.Tensor  # scalar, differentiable w.r.t. the classifier through the confidences
    confidence: torch.Tensor  # (B,) c, the true-class softmax probabilities used for pseudo generation
    latents: torch.Tensor  # (B, 4, h, w) z = E(c · x₀), graph kept (tests check ∂L/∂z)
    timesteps: torch.Tensor  # (B,) t


class LatentDistillation:
    """L_LD for a batch, given the classifier's logits on it; one per run, sharing the run's frozen LDM."""

    def __init__(self, ldm: LatentDiffusion, class_prompts: list[str], settings: LDSettings) -> None:
        if settings.grad not in GRAD_FORMS or settings.weighting not in WEIGHTINGS or \
                settings.reference not in REFERENCES:
            raise ValueError(f"ld_grad must be one of {GRAD_FORMS}, ld_weighting one of {WEIGHTINGS} and "
                             f"ld_reference one of {REFERENCES}")
        self.ldm = ldm
        self.settings = settings
        self.prompt_embeds = ldm.encode_prompts(class_prompts)  # (K, L, D): prompt(y) is row y
        self.uncond_embed = ldm.encode_prompts([""]) if settings.reference == "uncond" else None
        T = ldm.num_train_timesteps
        self.t_range = (round(settings.t_min * T), min(T - 1, round(settings.t_max * T)))

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        """w(t), shaped to broadcast over latents."""
        w = 1 - self.ldm.alphas_cumprod[t] if self.settings.weighting == "sds" else torch.ones(len(t))
        return w.to(self.ldm.device, torch.float32).view(-1, 1, 1, 1)

    def __call__(self, logits: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator) -> LDOutput:
        """`logits` of the classifier on `images` (B, C, H, W) in [0, 1] with true `labels`; noise and t come from
        the CPU `generator`, so a seeded run draws the same t and ε on every device."""
        ldm = self.ldm
        # 1. Pseudo generation: darken each image by the classifier's confidence in its true label.
        confidence = logits.softmax(dim=1).gather(1, labels[:, None]).squeeze(1)
        pseudo = confidence.view(-1, 1, 1, 1) * to_ldm_images(images, ldm.image_size)
        # 2. Gradient distillation: encode with graph, noise to a random t, let the frozen UNet predict the noise.
        z = ldm.encode(pseudo)
        z = z.float() if z.dtype == torch.float16 else z  # fp16 models: the loss in fp32; fp64 (tests) kept
        t = torch.randint(self.t_range[0], self.t_range[1] + 1, (len(z),), generator=generator)
        noise = torch.randn(z.shape, generator=generator).to(z)
        t = t.to(ldm.device)
        embeds = self.prompt_embeds[labels.to(self.prompt_embeds.device)]
        w = self.weights(t).to(z)
        # 3. The loss from ε̂ − r, reaching θ through c only.
        if self.settings.grad == "sds":
            with torch.no_grad():
                eps_hat, reference = self._predict(ldm.add_noise(z.detach(), noise, t), t, embeds, noise)
            g = w * (eps_hat - reference)
            # = ½‖z − sg(z − g)‖² / B in value and gradient, written so that ∂L/∂z is g / B without round-off.
            loss = ((z - z.detach()) * g).sum() / len(z) + 0.5 * g.pow(2).sum() / len(z)
        else:
            eps_hat, reference = self._predict(ldm.add_noise(z, noise, t), t, embeds, noise)
            loss = 0.5 * (w * (eps_hat - noise).pow(2)).sum() / len(z)
            if self.uncond_embed is not None:
                loss = loss - 0.5 * (w * (reference - noise).pow(2)).sum() / len(z)
        return LDOutput(loss, confidence, z, t)

    def _predict(self, z_t: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor,
                 noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε̂, r) from one UNet call: the conditional and unconditional rows are batched together for "uncond"."""
        if self.uncond_embed is None:
            return self.ldm.predict_noise(z_t, t, embeds, self.settings.guidance).to(noise), noise
        uncond = self.uncond_embed.to(embeds).expand_as(embeds)
        both = self.ldm.predict_noise(torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([embeds, uncond]),
                                      self.settings.guidance).to(noise)
        eps_hat, eps_uncond = both.chunk(2)
        return eps_hat, eps_uncond
