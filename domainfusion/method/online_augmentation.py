"""Online lightweight augmentation (method.md §2): a small on-disk synthetic pool, refreshed by the frozen LDM.

The pool starts as a copy of a random subset of the source images. Every T epochs (first at epoch 0) each pool
image x is replaced, step by step:
1. N candidates by SDEdit img2img from x (`aug_refresh_from=pool`, the paper: the current pool image) or from the
   real image it descends from (`source`: edits do not chain over refreshes), DDIM, at strength s (or strengths
   spread evenly over s ± `aug_strength_spread`, one per candidate), conditioned on the class prompt or, with style
   words, on the class prompt in a look: each source domain's in turn, or phrases of a fixed style vocabulary;
2. style (channel mean/std) and content (instance-normalised map) of x and of each candidate, in a feature space:
   the 4-channel VAE latent (`aug_style_space=latent`) or the VAE encoder's deepest feature map (`vae_features`,
   96 channels on the embedded LDM, 512 on SD: style statistics of many channels, as MODE-A takes from VGG);
3. s* = the candidate style farthest from x's (L2), c* = the candidate content closest to x's (cosine);
4. new = decode(AdaIN(content c*, style s*)) (the feature map first finishes the encoder to a latent), mapped
   back to the dataset's channels and size; x's label is kept.
Every candidate counts as a generated image (|pool|·N per refresh): the number the paper compares with CDGA.

The pool (`data/pool.py`) lives on disk as uint8 shards, one folder per generation; a refresh writes the next
generation beside the current one and switches to it atomically, so a kill mid-refresh leaves the previous pool.

Under data parallelism every rank holds the frozen LDM and transforms its contiguous block of each shard (image i
is seeded by its pool position, so blocks give the single-process images); rank 0 gathers the blocks, writes the
generation, and after a barrier every rank reads the new pool.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .. import distributed
from ..data.pool import Chunk, SyntheticPool
from ..images import to_uint8
from ..ldm.adapt import from_ldm_images, to_ldm_images
from ..ldm.grids import save_grid
from ..utils import seed_hash
from .style_content import recombine, select_style_content, selection_stats

if TYPE_CHECKING:
    from ..ldm.latent_diffusion import LatentDiffusion

GRID_IMAGES = 8
SELECTIONS = ("style_content", "random")
STYLE_WORDS = ("none", "source_domains", "vocabulary")
STYLE_SPACES = ("latent", "vae_features")
REFRESH_FROM = ("pool", "source")


@dataclass(frozen=True)
class AugSettings:
    """The [decision] knobs of method.md §2; every one is an hparam (`aug_*`, `img2img_*`) in the registry, which
    holds the defaults."""

    every_epochs: float  # T, in passes over all source images
    candidates: int  # N
    strength: float  # SDEdit strength s
    steps: int  # DDIM steps at strength 1 (int(steps · s) run)
    guidance: float
    pool_fraction: float
    selection: str  # "style_content" or "random" (the ablation)
    style_words: str  # "none" (the class prompt), "source_domains" or "vocabulary" (looks taken in turn)
    style_space: str  # "latent" or "vae_features"
    refresh_from: str  # "pool" (the paper: chained edits) or "source" (always from the real image)
    strength_spread: float  # candidate strengths spread evenly over strength ± this (clipped to [0, 1])

    @classmethod
    def from_hparams(cls, hp: dict, selection: str) -> AugSettings:
        return cls(
            hp["aug_every_epochs"],
            hp["aug_candidates"],
            hp["img2img_strength"],
            hp["img2img_steps"],
            hp["img2img_guidance"],
            hp["aug_pool_fraction"],
            selection,
            hp["aug_style_words"],
            hp["aug_style_space"],
            hp["aug_refresh_from"],
            hp["aug_strength_spread"],
        )

    def strengths(self) -> list[float]:
        """The SDEdit strength of candidate j = 0 … N−1."""
        n = self.candidates
        offsets = [2 * j / (n - 1) - 1 for j in range(n)] if n > 1 else [0.0]
        return [min(1.0, max(0.0, self.strength + self.strength_spread * o)) for o in offsets]


@dataclass
class Refreshed:
    """One chunk's refresh, in the LDM's RGB space: what the grid shows."""

    originals: torch.Tensor  # (B, 3, S, S)
    candidates: torch.Tensor  # (B, N, 4, h, w) latents
    style_pick: torch.Tensor  # (B,)
    content_pick: torch.Tensor  # (B,)
    results: torch.Tensor  # (B, 3, S, S)
    stats: dict[str, torch.Tensor]  # per image: how the picks compare with the average candidate (`selection_stats`)


class OnlineAugmentation:
    """Owns the pool and its refresh schedule for one run.

    `prompts[y]` lists the prompts of class y: one (the class prompt), or one per style (per source domain, or per
    vocabulary phrase). In refresh k, candidate j of the image at pool position p is conditioned on
    `prompts[y][(p + j + k·N) % len(prompts[y])]`, so the N candidates of an image go through the styles in turn (all
    of them when N ≥ their number), neighbouring images start at different ones and each refresh moves on; being a
    function of the position, it is the same on every rank and every resume.

    `origin` holds the pool's first generation (copies of the real images) when `refresh_from` is "source".
    """

    def __init__(
        self,
        ldm: LatentDiffusion,
        pool: SyntheticPool,
        prompts: list[list[str]],
        input_shape: tuple[int, int, int],
        settings: AugSettings,
        seed: int,
        grid_dir: Path | None = None,
        origin: SyntheticPool | None = None,
    ) -> None:
        for name, value, allowed in (
            ("selection", settings.selection, SELECTIONS),
            ("style_words", settings.style_words, STYLE_WORDS),
            ("style_space", settings.style_space, STYLE_SPACES),
            ("refresh_from", settings.refresh_from, REFRESH_FROM),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if settings.refresh_from == "source" and origin is None:
            raise ValueError("refresh_from='source' needs the pool's origin (its copies of the real images)")
        self.ldm, self.pool, self.prompts, self.origin = ldm, pool, prompts, origin
        self.input_shape, self.settings, self.seed, self.grid_dir = input_shape, settings, seed, grid_dir

    def due(self, epoch: float) -> bool:
        """Refresh k happens at the first step whose epoch reaches k·T (refresh 0 at the start of training)."""
        return epoch >= self.pool.refreshes * self.settings.every_epochs

    def candidate_prompts(self, labels: torch.Tensor, first: int, refresh: int = 0) -> list[str]:
        """The N prompts of each image (image i at pool position first + i) in refresh `refresh`, image-major."""
        n = self.settings.candidates
        return [
            variants[(first + i + j + refresh * n) % len(variants)]
            for i, variants in enumerate(self.prompts[int(y)] for y in labels)
            for j in range(n)
        ]

    def transform(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        first: int,
        seed: int,
        refresh: int = 0,
        random_picks: torch.Tensor | None = None,
    ) -> Refreshed:
        """Steps 1-4 for a batch of dataset-space images in [0, 1] that sit at pool positions first, first + 1, …;
        candidate j of image i is seeded seed + i·N + j. The "random" selection ablation takes its (style, content)
        candidate indices from `random_picks` (2, B)."""
        s, ldm = self.settings, self.ldm
        b, n = len(images), s.candidates
        originals = to_ldm_images(images.to(ldm.device), ldm.image_size)
        # Once per image: img2img starts from the latent, selection compares with the latent or the features.
        deep = s.style_space == "vae_features"
        features = ldm.encode_features(originals) if deep else None
        source = ldm.latents_from_features(features) if deep else ldm.encode(originals)
        prompts = self.candidate_prompts(labels, first, refresh)
        candidates = torch.stack(
            [
                ldm.img2img(
                    None,
                    prompts[j::n],
                    strength=strength,
                    num_inference_steps=s.steps,
                    guidance_scale=s.guidance,
                    seed=[seed + i * n + j for i in range(b)],
                    output="latents",
                    latents=source,
                ).float()
                for j, strength in enumerate(s.strengths())
            ],
            dim=1,
        )  # (B, N, 4, h, w)
        if deep:
            space = features.float()
            space_candidates = ldm.encode_features(ldm.decode(candidates.flatten(0, 1))).float().unflatten(0, (b, n))
        else:
            space, space_candidates = source.float(), candidates
        if s.selection == "style_content":
            style_pick, content_pick = select_style_content(space, space_candidates)
        else:
            style_pick, content_pick = random_picks.to(ldm.device)
        mixed = recombine(space_candidates, style_pick, content_pick)
        results = ldm.decode(ldm.latents_from_features(mixed) if deep else mixed)
        stats = selection_stats(space, space_candidates, style_pick, content_pick)
        return Refreshed(originals, candidates, style_pick, content_pick, results, stats)

    def refresh(self) -> int:
        """Replace every pool image once; returns the number of images generated (|pool| · N)."""
        k = self.pool.refreshes
        generator = torch.Generator().manual_seed(seed_hash(self.seed, "aug_select", k))
        seed = seed_hash(self.seed, "aug_img2img", k)

        def chunks() -> Iterator[Chunk]:
            start = 0
            inputs = self.origin if self.settings.refresh_from == "source" else self.pool
            for images, labels, sources in inputs.shards():
                picks = None
                if self.settings.selection == "random":  # drawn for the whole shard: the same on every rank
                    picks = torch.randint(self.settings.candidates, (2, len(images)), generator=generator)
                rows = distributed.shard_rows(len(images))  # this rank's block (all of it for one process)

                def refreshed() -> Chunk:
                    # In parts of at most the LDM's max_batch images: a transform holds N decoded candidates (and
                    # their feature maps) per image, so its memory follows the part, never the shard.
                    results = []
                    for part in self.ldm.chunks(rows.stop - rows.start, start=rows.start):
                        first = start + part.start
                        out = self.transform(
                            images[part].float() / 255,
                            labels[part],
                            first,
                            seed + first * self.settings.candidates,
                            k,
                            None if picks is None else picks[:, part],
                        )
                        if first == 0 and self.grid_dir is not None:
                            self.save_grid(out, self.grid_dir / f"refresh-{k:03d}.png")
                        results.append(to_uint8(from_ldm_images(out.results, self.input_shape)))
                    return torch.cat(results), labels[rows], sources[rows]

                yield from distributed.gather_chunk(rows, refreshed)
                start += len(images)

        generated = len(self.pool) * self.settings.candidates
        self.pool.replace(chunks(), generated)
        return generated

    def save_grid(self, out: Refreshed, path: Path) -> Path:
        """Rows = pool images; columns = original | N candidates | chosen style | chosen content | result."""
        m = min(GRID_IMAGES, len(out.originals))
        decoded = self.ldm.decode(out.candidates[:m].flatten(0, 1)).unflatten(0, (m, -1))
        rows = [
            torch.cat(
                [
                    out.originals[i : i + 1].cpu(),
                    decoded[i].cpu(),
                    decoded[i, out.style_pick[i]][None].cpu(),
                    decoded[i, out.content_pick[i]][None].cpu(),
                    out.results[i : i + 1].cpu(),
                ]
            )
            for i in range(m)
        ]
        candidates = [f"cand {j + 1}" for j in range(self.settings.candidates)]
        return save_grid(rows, path, column_titles=["orig", *candidates, "style", "content", "new"])
