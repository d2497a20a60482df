"""Latent Distillation (method.md §1): the frozen LDM's class knowledge as a gradient prior on θ.

Two targets (`ld_target`), both one loss per image on a sub-batch, scale-free (means over latent elements, so one
λ_LD means the same on the embedded 8×8×4 latent and on Stable Diffusion's 64×64×4):

**"confidence"** (the paper's form). For a source image x₀ in [0, 1] with label y, step by step:
1. Pseudo generation: c = softmax(f_θ(x₀))_y, the confidence in the *true* class; x(θ) = c · x₀ (a low-confidence
   image is dark and low-contrast).
2. Gradient distillation: z = E(x(θ)) (VAE posterior mean, differentiable in c by one forward-mode JVP, see
   `encode_linearised`: no encoder graph is kept), t ~ U{t_min·T, …, t_max·T}, ε ~ N(0, I),
   z_t = √ᾱ_t z + √(1−ᾱ_t) ε, ε̂ = ε_φ(z_t; prompt(y), t) from the frozen UNet (class prompt embedding cached).
3. The loss, built from ε̂ − r, reaches θ only through c. The reference r is the drawn noise ε (method.md; default
   `ld_reference="noise"`) or the UNet's unconditional prediction ε̂_∅ ("uncond": classifier score distillation,
   Yu et al. 2023 — the implicit classifier ∇ log p(y | z) instead of the density ∇ log p(z | y); with the embedded
   LDM the density rewards dark images whatever the class, see docs/method.md):
   - "sds" (default, as DreamFusion): the UNet runs without grad, g = w(t)(ε̂ − r), L = ½ mean_i (z_i − sg(z_i − g_i))²
     over the B·n latent elements, so ∂L/∂z_i = g_i / (B·n) exactly, with no UNet backward pass;
   - "full" (ablation): L = ½ mean_i w(t)((ε̂_i − ε_i)² − (ε̂_∅,i − ε_i)²), the second term only for "uncond"
     (there L estimates −log p(y | z) as a diffusion classifier does); ∂L/∂z by a backward pass through the UNet
     of the un-normalised sum (per-element gradients w(ε̂ − ε), O(1)), divided by B·n in fp32 afterwards: a fixed
     loss scale that keeps an fp16 UNet's backward out of fp16's subnormal range (the mean's per-element
     gradients at 64×64×4 latents are ~1e-6), with no GradScaler since no LDM parameter is trained.
   w(t) = 1 − ᾱ_t ("sds") or 1 ("uniform").
   Through x(θ) = c·x₀ the gradient reaches the logits through one scalar per image: parallel to cross-entropy's.
   Both forms end as L = value + Σ_i (z_i − sg(z_i))·∂L/∂z_i, so the step's backward pass only meets ∂z/∂c.

**"posterior"** (beyond the paper; docs/method.md). The LDM as a zero-shot classifier (Li et al., ICCV 2023), its
posterior distilled into f_θ. For each image x (source or pool) with logits f_θ(x):
1. Candidate classes: all K, or the classifier's top-k (`ld_top_k`) with the true label swapped in for the last one
   when missing, so the LDM always judges the label.
2. z = E(x) (no graph), D (t, ε) draws (`ld_draws`) shared by every candidate class, e_k = mean over draws and
   latent elements of (ε̂(z_t; prompt(k), t) − ε)² — the probe's `denoising_errors`, K'·D UNet rows per image.
3. q = softmax(−e / τ) over the candidates (`ld_temperature`), L = KL(q ‖ softmax(f_θ(x)) restricted to the
   candidates), mean over images: ∂L/∂logit_k = (p_k − q_k) / B on the candidates, 0 elsewhere. Every class's
   logit moves, so the LDM's view of which classes an image resembles reaches θ, not only a weight on y.

What it must not do: update the LDM (its parameters are frozen and outside the classifier's optimiser) or run the
classifier again (the caller passes the logits of the CE forward pass). UNet evaluations are counted per call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.autograd import forward_ad
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..ldm.adapt import to_ldm_images
from ..ldm.probe import denoising_errors

if TYPE_CHECKING:
    from ..ldm.latent_diffusion import LatentDiffusion

TARGETS = ("confidence", "posterior")
GRAD_FORMS = ("sds", "full")
WEIGHTINGS = ("sds", "uniform")
REFERENCES = ("noise", "uncond")


@dataclass(frozen=True)
class LDSettings:
    """The [decision] knobs of method.md §1; every one is an hparam (`ld_*`) in the registry, which holds the
    defaults."""

    weight: float  # λ_LD
    batch_size: int  # LD sub-batch: images distilled per step
    t_min: float  # fractions of the number of training timesteps T
    t_max: float
    weighting: str  # "sds" (1 − ᾱ_t) or "uniform"
    grad: str  # "sds" or "full"
    guidance: float
    reference: str  # "noise" (ε, method.md) or "uncond" (ε̂_∅, classifier score distillation)
    target: str  # "confidence" (the paper's x(θ) = c·x₀) or "posterior" (the LDM's class posterior)
    draws: int  # posterior: (t, ε) draws per image, shared by its candidate classes
    top_k: int  # posterior: candidate classes per image (all when the dataset has at most this many)
    temperature: float  # posterior: τ of softmax(−e / τ), e the mean squared ε error per latent element

    @classmethod
    def from_hparams(cls, hp: dict) -> LDSettings:
        return cls(
            hp["ld_weight"],
            hp["ld_batch_size"],
            hp["ld_t_min"],
            hp["ld_t_max"],
            hp["ld_weighting"],
            hp["ld_grad"],
            hp["ld_guidance"],
            hp["ld_reference"],
            hp["ld_target"],
            hp["ld_draws"],
            hp["ld_top_k"],
            hp["ld_temperature"],
        )


@dataclass
class LDOutput:
    loss: torch.Tensor  # scalar, differentiable w.r.t. the classifier's logits
    confidence: torch.Tensor  # (B,) softmax probability of the true class
    latents: torch.Tensor  # (B, 4, h, w) z (differentiable for "confidence": tests check ∂L/∂z)
    timesteps: torch.Tensor  # (B,) t ("confidence") or (D,) the shared draws ("posterior")
    unet_evals: int  # UNet rows evaluated (an image under one prompt at one t)
    posterior: torch.Tensor | None = None  # (B, K') the LDM's posterior q over each image's candidate classes
    candidates: torch.Tensor | None = None  # (B, K') class indices of those candidates


class LatentDistillation:
    """L_LD for a batch, given the classifier's logits on it; one per run, sharing the run's frozen LDM."""

    def __init__(self, ldm: LatentDiffusion, class_prompts: list[str], settings: LDSettings) -> None:
        if (
            settings.target not in TARGETS
            or settings.grad not in GRAD_FORMS
            or settings.weighting not in WEIGHTINGS
            or settings.reference not in REFERENCES
        ):
            raise ValueError(
                f"ld_target must be one of {TARGETS}, ld_grad one of {GRAD_FORMS}, ld_weighting one "
                f"of {WEIGHTINGS} and ld_reference one of {REFERENCES}"
            )
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

    def __call__(
        self, logits: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> LDOutput:
        """`logits` of the classifier on `images` (B, C, H, W) in [0, 1] with true `labels`; noise and t come from
        the CPU `generator`, so a seeded run draws the same t and ε on every device."""
        if self.settings.target == "posterior":
            return self._posterior_loss(logits, images, labels, generator)
        return self._confidence_loss(logits, images, labels, generator)

    def _confidence_loss(
        self, logits: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> LDOutput:
        ldm = self.ldm
        # 1. Pseudo generation: darken each image by the classifier's confidence in its true label.
        confidence = logits.softmax(dim=1).gather(1, labels[:, None]).squeeze(1)
        # 2. Gradient distillation: encode (differentiable in c), noise to a random t, the frozen UNet predicts it.
        z = encode_linearised(ldm, confidence, to_ldm_images(images.detach(), ldm.image_size))
        z = z.float() if z.dtype == torch.float16 else z  # fp16 models: the loss in fp32; fp64 (tests) kept
        t = torch.randint(self.t_range[0], self.t_range[1] + 1, (len(z),), generator=generator)
        noise = torch.randn(z.shape, generator=generator).to(z)
        t = t.to(ldm.device)
        embeds = self.prompt_embeds[labels.to(self.prompt_embeds.device)]
        w = self.weights(t).to(z)
        n = z.numel()  # B · elements per latent: every sum below is a mean over them (scale-free)
        # 3. The loss from ε̂ − r as B·n · value and g = B·n · ∂L/∂z, reaching θ through c only.
        if self.settings.grad == "sds":
            with torch.no_grad():
                eps_hat, reference = self._predict(ldm.add_noise(z.detach(), noise, t), t, embeds, noise)
            g = w * (eps_hat - reference)
            value = 0.5 * g.pow(2).sum()  # = ½ Σ (z − sg(z − g))²
        else:
            # Differentiated part by part, each part's UNet graph freed before the next: memory follows max_batch,
            # never ld_batch_size (the loss is a sum over images, so the parts' gradients are the whole's).
            rows_per_image = 1 if self.uncond_embed is None else 2
            g, value = torch.empty_like(z), z.new_zeros(())
            for a in range(0, len(z), step := max(1, ldm.batch_limit(self.settings.guidance) // rows_per_image)):
                part = slice(a, a + step)
                with torch.enable_grad():
                    z_leaf = z[part].detach().requires_grad_()
                    eps_hat, reference = self._predict(
                        ldm.add_noise(z_leaf, noise[part], t[part]), t[part], embeds[part], noise[part]
                    )
                    part_value = 0.5 * (w[part] * (eps_hat - noise[part]).pow(2)).sum()
                    if self.uncond_embed is not None:
                        part_value = part_value - 0.5 * (w[part] * (reference - noise[part]).pow(2)).sum()
                    (g[part],) = torch.autograd.grad(part_value, z_leaf)
                value = value + part_value.detach()
        # Written so that ∂L/∂z is g / n without round-off.
        loss = ((z - z.detach()) * g).sum() / n + value.detach() / n
        evals = len(z) * (1 if self.uncond_embed is None else 2)
        return LDOutput(loss, confidence, z, t, evals)

    def candidates(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, K') class indices each image is judged on: all classes, or the classifier's top-k with the label."""
        b, k = logits.shape
        if k <= self.settings.top_k:
            return torch.arange(k, device=logits.device).expand(b, k)
        top = logits.detach().topk(self.settings.top_k, dim=1).indices
        missing = ~(top == labels[:, None]).any(dim=1)
        top[missing, -1] = labels[missing]
        return top

    def _posterior_loss(
        self, logits: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> LDOutput:
        ldm, s = self.ldm, self.settings
        candidates = self.candidates(logits, labels)
        with torch.no_grad():
            z = ldm.encode(to_ldm_images(images.detach(), ldm.image_size))
        t = torch.randint(self.t_range[0], self.t_range[1] + 1, (s.draws,), generator=generator)
        noise = torch.randn((s.draws, *z.shape[1:]), generator=generator)
        errors = denoising_errors(
            ldm, z, self.prompt_embeds, candidates.cpu(), t, noise, batch_size=len(z) * candidates.shape[1] * s.draws
        )
        q = (-errors.mean(2) / s.temperature).softmax(dim=1).to(logits.device, logits.dtype)
        log_p = logits.gather(1, candidates).log_softmax(dim=1)
        loss = (q * (q.clamp_min(1e-30).log() - log_p)).sum(dim=1).mean()
        confidence = logits.detach().softmax(dim=1).gather(1, labels[:, None]).squeeze(1)
        return LDOutput(loss, confidence, z, t, errors.numel(), q, candidates)

    def _predict(
        self, z_t: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε̂, r) from one UNet call: the conditional and unconditional rows are batched together for "uncond"."""
        if self.uncond_embed is None:
            return self.ldm.predict_noise(z_t, t, embeds, self.settings.guidance).to(noise), noise
        uncond = self.uncond_embed.to(embeds).expand_as(embeds)
        both = self.ldm.predict_noise(
            torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([embeds, uncond]), self.settings.guidance
        ).to(noise)
        eps_hat, eps_uncond = both.chunk(2)
        return eps_hat, eps_uncond


def encode_linearised(ldm: LatentDiffusion, scale: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """E(c·x) for per-image scalars c (B,) and images x in [0, 1], differentiable in c without the encoder's graph.

    One forward-mode pass of a dual input (tangent x) gives E(c·x) and ∂E(c·x)/∂c = J_E(c·x)·x together; the result
    E(c·x) + (c − sg(c))·∂E/∂c has E(c·x)'s value and the gradient w.r.t. c that backpropagating through the encoder
    gives, but autograd saves only ∂E/∂c (the latent's size) instead of every encoder activation (issue 19 estimates
    ~2.5 GB per image for SD's VAE at 512 px in fp16), at the cost of one forward pass carrying tangents. Attention
    uses the math SDPA kernel, the one with forward-mode derivatives; nothing is saved, so its attention matrix is
    transient.
    """
    pseudo = scale.detach().view(-1, 1, 1, 1) * images
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), forward_ad.dual_level():
        dual = forward_ad.make_dual(pseudo, images.to(pseudo.dtype).expand_as(pseudo).contiguous())
        z, dz_dc = forward_ad.unpack_dual(ldm.encode(dual))
    dtype = torch.promote_types(scale.dtype, z.dtype)  # an fp16 LDM's latents join fp32 logits in fp32
    return z.to(dtype) + (scale - scale.detach()).view(-1, 1, 1, 1).to(dtype) * dz_dc.to(dtype)
