"""CDGA-style offline generative augmentation (Hemati et al. 2023, "Cross Domain Generative Augmentation").

Before training, every source training image gets K img2img variants from the same frozen LDM DomainFusion uses.
Each variant's prompt embedding lies on the segment between two domain descriptions of the image's class: its own
domain's and a randomly chosen other source domain's ("a photo of a dog" → "a sketch of a dog"), at a uniform random
point α. Then ERM trains on real ∪ generated (one generated batch per step, as DomainFusion's pool batch), so the
only differences from DomainFusion are what is generated, when, and how much. Generated images are counted the
same way (every img2img output). Under data parallelism each rank generates its block of every source chunk (every
draw and seed is per image, so the blocks are the single-process images) and rank 0 writes the pool.
"""

from __future__ import annotations

import functools
from typing import Iterator

import torch

from .. import distributed
from ..data.loaders import domain_of
from ..ldm.adapt import domain_prompt, from_ldm_images, to_ldm_images
from ..data.pool import Chunk, subset_chunks
from ..images import to_uint8
from ..utils import seed_hash
from .base import RunContext, register
from .generative import PoolERM


@register("CDGA")
class CDGA(PoolERM):
    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, num_domains: int, hparams: dict,
                 pretrained: str | None = None, context: RunContext | None = None) -> None:
        super().__init__(input_shape, num_classes, num_domains, hparams, pretrained, context)
        variants = hparams["cdga_variants"]
        n_source = sum(len(d) for d in context.train_splits)
        self.pool = self.open_or_create_pool("cdga_pool", lambda: self.generate(variants), n_source * variants)

    def generate(self, variants: int) -> Iterator[Chunk]:
        """K variants of every source image, chunk by chunk (never the whole generated set in RAM), each rank's block
        in parts of at most the LDM's max_batch images (only the block's latents are kept, to reuse across the K
        variants: at the LDM's resolution, inputs and outputs exist for one part at a time)."""
        ctx, hp = self.context, self.hparams
        ldm = ctx.ldm()
        n_source = sum(len(d) for d in ctx.train_splits)
        generator = torch.Generator().manual_seed(seed_hash(ctx.seed, "cdga"))
        seed = seed_hash(ctx.seed, "cdga_img2img")
        for images_u8, labels, sources in subset_chunks(ctx.train_splits, 1.0, seed, ctx.num_workers):
            rows = distributed.shard_rows(len(labels))  # this rank's block (all of it for one process)
            block = images_u8[rows]
            parts = ldm.chunks(len(block))
            domains = domain_of(ctx.train_splits, sources)
            block_latents = functools.cache(lambda: torch.cat([  # the block is encoded once, whatever K
                ldm.encode(to_ldm_images(block[part].to(ldm.device).float().div(255), ldm.image_size))
                for part in parts]))
            for k in range(variants):
                embeds = self.interpolated_prompts(labels, domains, generator, rows)

                def variant() -> Chunk:
                    first_seed = seed + k * n_source + int(sources[rows.start])  # image i of the block: + i
                    out = [to_uint8(from_ldm_images(ldm.img2img(
                        None, prompt_embeds=embeds[part], latents=block_latents()[part],
                        strength=hp["img2img_strength"], num_inference_steps=hp["img2img_steps"],
                        guidance_scale=hp["img2img_guidance"], seed=first_seed + part.start), self.input_shape))
                        for part in parts]
                    return torch.cat(out), labels[rows], sources[rows]

                yield from distributed.gather_chunk(rows, variant)

    def interpolated_prompts(self, labels: torch.Tensor, domains: torch.Tensor, generator: torch.Generator,
                             rows: slice = slice(None)) -> torch.Tensor | None:
        """(1 − α)·E(own domain prompt) + α·E(other source domain prompt), α ~ U(0, 1), one per image; the draws
        are made for all images (the same on every rank), the embeddings for the images in `rows` only (None when
        `rows` is empty)."""
        ctx = self.context
        ldm = ctx.ldm()
        n_envs = len(ctx.train_env_names)
        shift = torch.randint(1, max(2, n_envs), (len(labels),), generator=generator)
        others = (domains + shift) % n_envs if n_envs > 1 else domains
        alpha = torch.rand(len(labels), generator=generator)[rows].to(ldm.device, ldm.dtype).view(-1, 1, 1)
        labels, domains, others = labels[rows], domains[rows], others[rows]
        if len(labels) == 0:
            return None

        def embed(envs: torch.Tensor) -> torch.Tensor:
            return ldm.encode_prompts([domain_prompt(ctx.dataset, ctx.train_env_names[int(e)],
                                                     ctx.class_names[int(y)]) for e, y in zip(envs, labels)])

        return torch.lerp(embed(domains), embed(others), alpha)
