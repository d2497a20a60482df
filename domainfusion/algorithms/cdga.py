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
from collections.abc import Iterator

import torch

from .. import distributed
from ..data.loaders import domain_of
from ..data.pool import Chunk, subset_chunks
from ..ldm.adapt import domain_prompt, encode_dataset_images, img2img_dataset_images
from ..utils import seed_hash
from .base import RunContext, register
from .generative import PoolERM


@register("CDGA")
class CDGA(PoolERM):
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
        variants = hparams["cdga_variants"]
        n_source = sum(len(d) for d in context.train_splits)
        self.pool = self.open_or_create_pool("cdga_pool", lambda: self.generate(variants), n_source * variants)

    def generate(self, variants: int) -> Iterator[Chunk]:
        """K variants of every source image, chunk by chunk (never the whole generated set in RAM); each rank's block
        is encoded once for the K variants, and only latents and uint8 results are kept (`adapt.encode_dataset_images`,
        `img2img_dataset_images`: the LDM's resolution exists for one max_batch part at a time)."""
        ctx, hp = self.context, self.hparams
        ldm = ctx.ldm()
        n_source = sum(len(d) for d in ctx.train_splits)
        generator = torch.Generator().manual_seed(seed_hash(ctx.seed, "cdga"))
        seed = seed_hash(ctx.seed, "cdga_img2img")
        for images_u8, labels, sources in subset_chunks(ctx.train_splits, 1.0, seed, ctx.num_workers):
            rows = distributed.shard_rows(len(labels))  # this rank's block (all of it for one process)
            domains = domain_of(ctx.train_splits, sources)
            block_latents = functools.cache(lambda: encode_dataset_images(ldm, images_u8[rows]))
            for k in range(variants):
                embeds = self.interpolated_prompts(labels, domains, generator, rows)

                def variant() -> Chunk:
                    first_seed = seed + k * n_source + int(sources[rows.start])  # image i of the block: + i
                    out = img2img_dataset_images(
                        ldm,
                        block_latents(),
                        self.input_shape,
                        prompt_embeds=embeds,
                        strength=hp["img2img_strength"],
                        num_inference_steps=hp["img2img_steps"],
                        guidance_scale=hp["img2img_guidance"],
                        seed=first_seed,
                    )
                    return out, labels[rows], sources[rows]

                yield from distributed.gather_chunk(rows, variant)

    def interpolated_prompts(
        self, labels: torch.Tensor, domains: torch.Tensor, generator: torch.Generator, rows: slice = slice(None)
    ) -> torch.Tensor | None:
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
            return ldm.encode_prompts(
                [
                    domain_prompt(ctx.dataset, ctx.train_env_names[int(e)], ctx.class_names[int(y)])
                    for e, y in zip(envs, labels)
                ]
            )

        return torch.lerp(embed(domains), embed(others), alpha)
