"""What does an LDM know about each domain? Its zero-shot accuracy as a diffusion classifier (Li et al., ICCV 2023).

DomainFusion rests on the frozen LDM knowing the classes in styles the source domains never show. Before spending GPU
hours, `domainfusion ldm probe` measures it per domain: each image is encoded once, noised with a fixed set of
(t, ε) draws, and the UNet predicts the noise under every class prompt; the class whose prompt gives the lowest
mean denoising error wins. The draws are the same for every class (so classes are compared on identical noise, the
variance that matters), and the same for every image (so numbers do not depend on batching). With many classes,
`top_k` keeps only the k classes with the lowest error after the first `prune_after` draws, as the original
method's adaptive evaluation does. Timesteps are spread evenly over [t_min, t_max] (uniform weighting, which Li et
al. found best), the noise is seeded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..errors import UserError
from .adapt import to_ldm_images
from .latent_diffusion import LatentDiffusion


@dataclass(frozen=True)
class ProbeConfig:
    """How the diffusion classifier spends its UNet calls."""

    draws: int = 12  # (t, ε) pairs per image and class
    t_min: int = 100
    t_max: int = 900
    top_k: int | None = None  # keep this many classes after `prune_after` draws (None: all classes, all draws)
    prune_after: int = 4
    batch_size: int = 256  # UNet batch (image, class, draw) triples per call
    seed: int = 0

    def __post_init__(self) -> None:
        if self.draws < 1:
            raise UserError(f"draws must be >= 1, got {self.draws}")
        if not 0 <= self.t_min <= self.t_max:
            raise UserError(f"need 0 <= t_min <= t_max, got t_min={self.t_min}, t_max={self.t_max}")
        if self.top_k is not None and (self.top_k < 1 or not 1 <= self.prune_after < self.draws):
            raise UserError(
                f"top_k needs top_k >= 1 and 1 <= prune_after < draws (got top_k={self.top_k}, "
                f"prune_after={self.prune_after}, draws={self.draws})"
            )


def probe_draws(
    config: ProbeConfig, latent_shape: tuple[int, ...], num_train_timesteps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared (timesteps (D,), noise (D, C, h, w)) of a probe: evenly spaced t, seeded ε."""
    if config.t_max >= num_train_timesteps:
        raise UserError(f"t_max={config.t_max} is beyond the model's {num_train_timesteps} training timesteps")
    t = torch.linspace(config.t_min, config.t_max, config.draws).round().long()
    noise = torch.randn((config.draws, *latent_shape), generator=torch.Generator().manual_seed(config.seed))
    return t, noise


@torch.no_grad()
def denoising_errors(
    ldm: LatentDiffusion,
    latents: torch.Tensor,
    class_embeds: torch.Tensor,
    candidates: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
    """Mean squared ε error (B, K', D) of each image under each of its candidate classes and each draw.

    latents: scaled latents (B, C, h, w); class_embeds: (K, L, E) prompt embeddings; candidates: (B, K') class
    indices per image; timesteps (D,) and noise (D, C, h, w) are shared by every image and class.
    """
    b, k = candidates.shape
    d = len(timesteps)
    image = torch.arange(b).repeat_interleave(k * d)
    cls = candidates.reshape(-1).repeat_interleave(d)
    draw = torch.arange(d).repeat(b * k)
    errors = []
    for s in range(0, len(image), batch_size):
        i, c, j = image[s : s + batch_size], cls[s : s + batch_size], draw[s : s + batch_size]
        eps = noise[j].to(ldm.device, ldm.dtype)
        t = timesteps[j].to(ldm.device)
        pred = ldm.predict_noise(ldm.add_noise(latents[i], eps, t), t, class_embeds[c])
        errors.append((pred.float() - eps.float()).pow(2).flatten(1).mean(1).cpu())
    return torch.cat(errors).view(b, k, d)


@torch.no_grad()
def classify(
    ldm: LatentDiffusion, images: torch.Tensor, class_prompts: list[str], config: ProbeConfig
) -> tuple[torch.Tensor, int]:
    """(mean error per class (B, K), UNet evaluations used) for images in [0, 1] at the LDM's resolution.

    Pruned classes get +inf, so `argmin` over the result is the prediction.
    """
    latents = ldm.encode(images)
    embeds = ldm.encode_prompts(class_prompts)
    timesteps, noise = probe_draws(config, tuple(latents.shape[1:]), ldm.num_train_timesteps)
    n_classes = len(class_prompts)
    everyone = torch.arange(n_classes).expand(len(images), -1)
    if config.top_k is None or config.top_k >= n_classes:
        err = denoising_errors(ldm, latents, embeds, everyone, timesteps, noise, config.batch_size)
        return err.mean(2), err.numel()
    first = config.prune_after
    early = denoising_errors(ldm, latents, embeds, everyone, timesteps[:first], noise[:first], config.batch_size)
    kept = early.mean(2).topk(config.top_k, dim=1, largest=False).indices
    late = denoising_errors(ldm, latents, embeds, kept, timesteps[first:], noise[first:], config.batch_size)
    early_kept = early.gather(1, kept[..., None].expand(-1, -1, first))
    mean = torch.full((len(images), n_classes), float("inf"))
    mean.scatter_(1, kept, torch.cat([early_kept, late], dim=2).mean(2))
    return mean, early.numel() + late.numel()


@dataclass(frozen=True)
class DomainKnowledge:
    """The probe's result on one domain."""

    domain: str
    images: int
    accuracy: float  # fraction of images whose lowest-error class prompt is their label
    per_class: list[float]  # accuracy per class (NaN for a class with no probed image)
    unet_calls: int  # UNet evaluations (image, class, draw) spent
    seconds: float


def probe_dataset(
    ldm: LatentDiffusion,
    dataset,
    class_prompts: list[str],
    images_per_domain: int,
    config: ProbeConfig,
    chunk: int = 64,
    progress: bool = True,
    domains: list[str] | None = None,
) -> list[DomainKnowledge]:
    """Zero-shot diffusion-classifier accuracy on a seeded random subset of every environment (or of `domains`) of
    `dataset` (a `MultipleDomainDataset` built at the LDM's resolution, without training augmentation)."""
    if images_per_domain < 1:
        raise UserError(f"images_per_domain must be >= 1, got {images_per_domain}")
    if len(class_prompts) != dataset.num_classes:
        raise UserError(f"{len(class_prompts)} class prompts for {dataset.num_classes} classes")
    unknown = sorted(set(domains or ()) - set(dataset.environments))
    if unknown:
        raise UserError(f"unknown domain(s) {unknown}; this dataset has {', '.join(dataset.environments)}")
    results = []
    for env_index, (name, env) in enumerate(zip(dataset.environments, dataset)):
        if domains and name not in domains:
            continue
        start = time.perf_counter()
        pick = torch.randperm(len(env), generator=torch.Generator().manual_seed(config.seed + env_index))
        pick = pick[:images_per_domain].tolist()
        hits, labels, calls = [], [], 0
        for s in tqdm(range(0, len(pick), chunk), desc=f"probe {name}", disable=not progress, leave=False):
            x, y = zip(*(env[i] for i in pick[s : s + chunk]))
            images = to_ldm_images(torch.stack(x), ldm.image_size)
            errors, used = classify(ldm, images, class_prompts, config)
            hits.append(errors.argmin(1) == torch.as_tensor(y))
            labels.append(torch.as_tensor(y))
            calls += used
        hit, label = torch.cat(hits).float(), torch.cat(labels)
        per_class = [
            hit[label == c].mean().item() if (label == c).any() else float("nan") for c in range(dataset.num_classes)
        ]
        results.append(
            DomainKnowledge(name, len(pick), hit.mean().item(), per_class, calls, time.perf_counter() - start)
        )
    return results
