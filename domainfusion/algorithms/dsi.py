"""DSI-style baseline: one LDM fine-tuned per source domain (Yu et al., CVPR 2023), measured in two readings.

Both modes first fine-tune a copy of the run's shared LDM on each source domain's training images — the run's
in-split of that domain, nothing else (never a held-out domain, never an out-split) — with the trainer that trained
the embedded LDM (`ldm/training.py`, UNet only by default: `dsi_finetune_vae_steps` = 0, see that module for why).
Captions are the class prompts, so each model learns "digit k in my domain's style"; 10% caption dropout (the
trainer's default) also teaches it an unconditional "an image of my domain". The models are written to
OUTPUT_DIR/dsi_ldm/<domain>/ldm (diffusers, safetensors) and reused whenever a run with the same settings and data
finds them (a resumed run, or a restart killed before its first checkpoint); the shared LDM is only read. As the
default fine-tune changes only the UNet, the loaded source models are one UNet each around the shared LDM's VAE,
text encoder and scheduler: N models cost N UNets, not N LDMs (a fine-tuned VAE is loaded per model). For Stable
Diffusion on a GPU, `dsi_finetune_precision` and `dsi_finetune_gradient_checkpointing` bound a fine-tune's memory,
and translations run in parts of the LDM's `max_batch` images (docs/sd_scale.md).

- `DSI` (train-time, the issue's reading): every source image (a seeded `dsi_translate_fraction` of them) is
  translated into each *other* source domain's style by that domain's model (SDEdit img2img with its class prompt,
  the `img2img_*` settings CDGA uses), once before training; ERM then trains on real ∪ translated with the same pool
  mechanics as CDGA (`synthetic_fraction` of each step). Generated images = selected images × (sources − 1).
- `DSI_TestTime` (the paper's reading): plain ERM training; in eval mode `predict` translates each image toward every
  source domain with that domain's model (img2img at `dsi_test_strength`, the empty prompt — the label is unknown at
  test time — and no guidance) and returns the log of the classifier's softmax averaged over those source-domain
  versions. `predict` is what every evaluation split goes through, so validation (out-splits) is translated too,
  exactly as test images are; translations of an image are computed once per process and cached (uint8, in RAM),
  so later checkpoints only pay for the classifier. They are counted as generated images.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..data.loaders import domain_of
from ..data.pool import Chunk, subset_chunks
from ..ldm.adapt import default_prompt_template, encode_dataset_images, img2img_dataset_images
from ..utils import seed_hash
from .base import RunContext, register
from .generative import PoolERM

if TYPE_CHECKING:
    from ..ldm import LatentDiffusion

FOLDER = "dsi_ldm"


class PerDomainLDMs(PoolERM):
    """What both DSI readings share: one LDM fine-tuned (or reused) per source domain when built, loaded on use."""

    # Not data parallel yet: every rank would fine-tune into the same OUTPUT_DIR/dsi_ldm and count only its share of
    # test-time translations (`domainfusion train` refuses it under torchrun/accelerate).
    DATA_PARALLEL = False

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        num_domains: int,
        hparams: dict,
        pretrained: str | None = None,
        context: RunContext | None = None,
    ) -> None:
        super().__init__(input_shape, num_classes, num_domains, hparams, pretrained, context)
        self.shares_vae = hparams["dsi_finetune_vae_steps"] == 0  # the default: only the UNets are fine-tuned
        self.finetune_s: list[float] = []  # per source model, all its fine-tuning invocations
        self.model_dirs = [self.finetune(d) for d in range(len(context.train_splits))]
        self._models: list[LatentDiffusion] = []

    def finetune(self, d: int) -> Path:
        """Fine-tune a copy of the shared LDM on source domain d's in-split (or reuse an identical earlier one)."""
        from ..ldm.train_config import LDMTrainConfig
        from ..ldm.training import train_or_reuse
        from ..ldm.training_data import dataset_training_data

        ctx, hp = self.context, self.hparams
        name = ctx.train_env_names[d]
        out = ctx.output_dir / FOLDER / name
        steps = hp["dsi_finetune_steps"]
        config = LDMTrainConfig(
            output_dir=str(out),
            data_dir=ctx.data_dir,
            init_from=ctx.ldm_model,
            vae_steps=hp["dsi_finetune_vae_steps"],
            vae_lr=hp["dsi_finetune_lr"],
            vae_batch_size=hp["dsi_finetune_batch_size"],
            unet_steps=steps,
            unet_lr=hp["dsi_finetune_lr"],
            unet_batch_size=hp["dsi_finetune_batch_size"],
            unet_precision=hp["dsi_finetune_precision"],
            unet_gradient_checkpointing=hp["dsi_finetune_gradient_checkpointing"],
            warmup_steps=max(1, steps // 10),
            seed=seed_hash(ctx.seed, "dsi_finetune", d),
            log_every=max(1, steps // 10),
            checkpoint_every=max(1, steps // 4),
            sample_every=0,
            sample_seeds=2,
            sample_steps=10,
            device=str(ctx.device),
            progress=False,
        )
        template = ctx.prompt_template or default_prompt_template(ctx.dataset)
        data = dataset_training_data(
            [ctx.train_splits[d]],
            [name],
            ctx.class_names,
            template,
            ctx.ldm().image_size,
            seed=config.seed,
            num_workers=ctx.num_workers,
        )
        trained = train_or_reuse(config, data)
        self.finetune_s.append(trained.wall_s)
        return trained.folder

    def models(self) -> list[LatentDiffusion]:
        """The fine-tuned LDMs, loaded on first use (order = source domains); with `shares_vae`, each is its own
        UNet around the shared LDM's other modules."""
        if not self._models:
            from ..ldm import LatentDiffusion

            shared = self.context.ldm()
            if self.shares_vae:
                self._models = [
                    LatentDiffusion(
                        shared.vae,
                        type(shared.unet).from_pretrained(p, subfolder="unet"),
                        shared.text_encoder,
                        shared.tokenizer,
                        shared.scheduler,
                        device=shared.device,
                        dtype=shared.dtype,
                        max_batch=shared.max_batch,
                    )
                    for p in self.model_dirs
                ]
            else:
                self._models = [
                    LatentDiffusion.from_pretrained(
                        p, device=shared.device, dtype=shared.dtype, max_batch=shared.max_batch
                    )
                    for p in self.model_dirs
                ]
        return self._models

    def checkpoint_stats(self) -> dict[str, float]:
        return {
            **super().checkpoint_stats(),
            "ldm_finetuned_models": len(self.model_dirs),
            "ldm_finetune_s": sum(self.finetune_s),
        }

    @torch.no_grad()
    def latents(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The VAE latents of x (float in [0, 1], or uint8) for each source model, one VAE pass when they share the
        VAE (`adapt.encode_dataset_images`: only the latents are kept)."""
        models = self.models()
        encoded = [encode_dataset_images(m, x) for m in (models[:1] if self.shares_vae else models)]
        return encoded * len(models) if self.shares_vae else encoded

    def translate(
        self,
        ldm: LatentDiffusion,
        latents: torch.Tensor,
        prompts: list[str],
        strength: float,
        guidance_scale: float,
        seed: int,
    ) -> torch.Tensor:
        """uint8 images of the dataset's shape: img2img from `latents` by `ldm` (image i seeded seed + i)."""
        return img2img_dataset_images(
            ldm,
            latents,
            self.input_shape,
            prompts=prompts,
            strength=strength,
            num_inference_steps=self.hparams["img2img_steps"],
            guidance_scale=guidance_scale,
            seed=seed,
        )


@register("DSI")
class DSI(PerDomainLDMs):
    """Train-time reading: ERM on real ∪ the sources translated into each other source's style."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        num_domains: int,
        hparams: dict,
        pretrained: str | None = None,
        context: RunContext | None = None,
    ) -> None:
        super().__init__(input_shape, num_classes, num_domains, hparams, pretrained, context)
        n_selected = max(1, round(hparams["dsi_translate_fraction"] * sum(len(d) for d in context.train_splits)))
        generated = n_selected * (len(context.train_splits) - 1)
        self.pool = self.open_or_create_pool("dsi_pool", self.translate_sources, generated)
        self._models = []  # training reads only the pool: free the fine-tuned models

    def translate_sources(self) -> Iterator[Chunk]:
        """Each selected source image, translated by every other source domain's model (chunk by chunk)."""
        ctx, hp = self.context, self.hparams
        total = sum(len(d) for d in ctx.train_splits)
        prompts = ctx.class_prompts()
        seed = seed_hash(ctx.seed, "dsi_img2img")
        for images_u8, labels, sources in subset_chunks(
            ctx.train_splits, hp["dsi_translate_fraction"], seed_hash(ctx.seed, "dsi_subset"), ctx.num_workers
        ):
            domains = domain_of(ctx.train_splits, sources)
            latents = self.latents(images_u8)
            for target, (ldm, z) in enumerate(zip(self.models(), latents)):
                keep = domains != target
                if not keep.any():
                    continue
                out = self.translate(
                    ldm,
                    z[keep],
                    [prompts[int(y)] for y in labels[keep]],
                    hp["img2img_strength"],
                    hp["img2img_guidance"],
                    seed + target * total + int(sources[0]),
                )
                yield out, labels[keep], sources[keep]


@register("DSI_TestTime")
class DSITestTime(PerDomainLDMs):
    """Test-time reading: ERM training; evaluation averages the classifier over each image's source-style versions."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        num_domains: int,
        hparams: dict,
        pretrained: str | None = None,
        context: RunContext | None = None,
    ) -> None:
        super().__init__(input_shape, num_classes, num_domains, hparams, pretrained, context)
        self.register_buffer("translated_images", torch.zeros((), dtype=torch.long))
        self._cache: dict[str, torch.Tensor] = {}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.network(x)
        probs = torch.stack([self.network(t).softmax(dim=1) for t in self.source_versions(x)]).mean(dim=0)
        return probs.clamp_min(1e-12).log()

    def checkpoint_stats(self) -> dict[str, float]:
        return {
            **super().checkpoint_stats(),
            "generated_images": int(self.translated_images),
            "generation_s": self.generation_s.item(),
        }

    def source_versions(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x translated toward each source domain (one (B, C, H, W) batch per source), from the cache when seen."""
        keys = [hashlib.sha1(img.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest() for img in x]
        misses = [i for i, k in enumerate(keys) if k not in self._cache]
        if misses:
            with self.generating():
                new = self._translate(x[misses], seed_hash(self.context.seed, "dsi_test", keys[misses[0]]))
            for j, i in enumerate(misses):
                self._cache[keys[i]] = new[:, j]
            self.translated_images += len(misses) * len(self.model_dirs)
        stacked = torch.stack([self._cache[k] for k in keys], dim=1)  # (sources, B, C, H, W) uint8
        return [s.to(x.device).float().div(255) for s in stacked]

    def _translate(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """(sources, B, C, H, W) uint8: x through each source model (empty prompt, no guidance)."""
        return torch.stack(
            [
                self.translate(ldm, z, [""] * len(x), self.hparams["dsi_test_strength"], 1.0, seed)
                for ldm, z in zip(self.models(), self.latents(x))
            ]
        )
