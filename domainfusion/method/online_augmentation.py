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

The pool lives on disk as uint8 safetensors shards, one folder per generation; a refresh writes the next
generation beside the current one and switches `manifest.json` atomically, so a kill mid-refresh leaves the previous
pool loadable and RAM never holds more than one shard.

Under data parallelism every rank holds the frozen LDM and transforms its contiguous block of each shard (image i
is seeded by its pool position, so blocks give the single-process images); rank 0 gathers the blocks, writes the
generation, and after a barrier every rank reads the new pool.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from .. import distributed
from ..ldm.adapt import from_ldm_images, to_ldm_images
from ..ldm.grids import save_grid
from ..utils import atomic_write_text, publish_dir, seed_hash
from .style_content import recombine, select_style_content, selection_stats

if TYPE_CHECKING:
    from ..ldm.latent_diffusion import LatentDiffusion

SHARD_SIZE = 1024
GRID_IMAGES = 8
SELECTIONS = ("style_content", "random")
STYLE_WORDS = ("none", "source_domains", "vocabulary")
STYLE_SPACES = ("latent", "vae_features")
REFRESH_FROM = ("pool", "source")
Chunk = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # uint8 images (B, C, H, W), labels (B,), source ids (B,)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


class SyntheticPool:
    """Labelled images on disk: `manifest.json` + `gen-XXXXXX/shard-XXXXX.safetensors` (images, labels, sources).

    `sources` are indices into the concatenated source training splits, so every pool image can be traced back to
    the real image it descends from. Only labels are held in RAM.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._load()

    def _load(self) -> None:
        self.manifest = json.loads((self.root / "manifest.json").read_text())
        self._handles: dict[str, object] = {}
        self.labels = torch.cat([self._open(name).get_tensor("labels") for name in self.manifest["shards"]])

    @classmethod
    def create(cls, root: str | Path, chunks: Iterable[Chunk], generated: int = 0) -> "SyntheticPool":
        """A fresh pool (refresh 0) from (images, labels, sources) chunks; `generated` counts the images the chunks
        cost to make (0 for copies of source images).

        Collective under data parallelism, as `replace`; copies of source images involve no work to share, so rank
        0 alone reads them and the other ranks leave their chunks untouched."""
        root = Path(root)
        if distributed.is_main():
            if root.exists():
                shutil.rmtree(root)
            root.mkdir(parents=True)
        elif not generated:
            chunks = ()
        manifest = {"generation": -1, "refreshes": 0, "generated": generated, "shards": [], "size": 0}
        _write_generation(root, manifest, chunks)
        return cls(root)

    def __len__(self) -> int:
        return self.manifest["size"]

    @property
    def refreshes(self) -> int:
        return self.manifest["refreshes"]

    @property
    def generated(self) -> int:
        return self.manifest["generated"]

    def _open(self, name: str):
        if name not in self._handles:
            path = self.root / f"gen-{self.manifest['generation']:06d}" / name
            self._handles[name] = safe_open(str(path), framework="pt")
        return self._handles[name]

    def shards(self) -> Iterator[Chunk]:
        """The current generation shard by shard, in pool order."""
        for name in self.manifest["shards"]:
            handle = self._open(name)
            yield handle.get_tensor("images"), handle.get_tensor("labels"), handle.get_tensor("sources")

    def read(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images and labels at pool positions `indices` (only those rows are read from disk)."""
        rows = []
        for i in indices.tolist():
            shard, offset = divmod(i, SHARD_SIZE)
            rows.append(self._open(self.manifest["shards"][shard]).get_slice("images")[offset:offset + 1])
        return torch.cat(rows), self.labels[indices]

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A uniform batch with replacement, as float images in [0, 1] (DomainBed's loaders sample the same way)."""
        indices = torch.randint(len(self), (batch_size,), generator=generator)
        images, labels = self.read(indices)
        return images.float() / 255, labels

    def replace(self, chunks: Iterable[Chunk], generated: int) -> None:
        """Write the next generation from `chunks` (which may read the current one), then switch to it.

        Collective under data parallelism: rank 0 writes the chunks its iterable yields; the other ranks run theirs
        to the end (their share of the work, see `distributed.gather_chunk`), then all open the new generation."""
        manifest = dict(self.manifest, refreshes=self.refreshes + 1, generated=self.generated + generated)
        _write_generation(self.root, manifest, chunks)
        old = self.root / f"gen-{self.manifest['generation']:06d}"
        self._load()
        if distributed.is_main():
            shutil.rmtree(old, ignore_errors=True)


def _write_generation(root: Path, manifest: dict, chunks: Iterable[Chunk]) -> None:
    """Rank 0 publishes the next generation while the other ranks run their chunks to the end; every rank returns
    once it is on disk."""
    if distributed.is_main():
        _publish_generation(root, manifest, chunks)
    else:
        for _ in chunks:
            pass
    distributed.barrier()


def _publish_generation(root: Path, manifest: dict, chunks: Iterable[Chunk]) -> None:
    """Publish gen-(k+1) from chunks re-cut into SHARD_SIZE shards, then point manifest.json at it."""
    generation = manifest["generation"] + 1
    names: list[str] = []
    size = 0

    def build(tmp: Path) -> None:
        nonlocal size
        pending: list[Chunk] = []
        for chunk in chunks:
            pending.append(chunk)
            while sum(len(c[0]) for c in pending) >= SHARD_SIZE:
                pending = _flush(tmp, names, pending, SHARD_SIZE)
                size += SHARD_SIZE
        rest = sum(len(c[0]) for c in pending)
        if rest:
            _flush(tmp, names, pending, rest)
            size += rest

    publish_dir(build, root / f"gen-{generation:06d}")
    if size == 0:
        raise ValueError("a synthetic pool needs at least one image")
    atomic_write_text(root / "manifest.json",
                      json.dumps(dict(manifest, generation=generation, shards=names, size=size), indent=2))


def _flush(folder: Path, names: list[str], pending: list[Chunk], n: int) -> list[Chunk]:
    """Write the first n pending images as the next shard; return the rest."""
    images, labels, sources = (torch.cat(parts) for parts in zip(*pending))
    name = f"shard-{len(names):05d}.safetensors"
    save_file({"images": images[:n].contiguous(), "labels": labels[:n].long(), "sources": sources[:n].long()},
              str(folder / name))
    names.append(name)
    return [(images[n:], labels[n:], sources[n:])] if n < len(images) else []


def subset_chunks(datasets: list[Dataset], fraction: float, seed: int) -> Iterator[Chunk]:
    """A seeded random `fraction` (at least one image) of the concatenated datasets, read chunk by chunk."""
    sizes = [len(d) for d in datasets]
    total = sum(sizes)
    k = max(1, round(fraction * total))
    chosen = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:k].sort().values
    offsets = torch.tensor([0] + sizes).cumsum(0)
    for part in chosen.split(SHARD_SIZE):
        images, labels = [], []
        for i in part.tolist():
            d = int(torch.searchsorted(offsets, i, right=True)) - 1
            x, y = datasets[d][i - int(offsets[d])]
            images.append(to_uint8(x))
            labels.append(int(y))
        yield torch.stack(images), torch.tensor(labels), part.clone()


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
    def from_hparams(cls, hp: dict, selection: str) -> "AugSettings":
        return cls(hp["aug_every_epochs"], hp["aug_candidates"], hp["img2img_strength"], hp["img2img_steps"],
                   hp["img2img_guidance"], hp["aug_pool_fraction"], selection, hp["aug_style_words"],
                   hp["aug_style_space"], hp["aug_refresh_from"], hp["aug_strength_spread"])

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

    def __init__(self, ldm: LatentDiffusion, pool: SyntheticPool, prompts: list[list[str]],
                 input_shape: tuple[int, int, int], settings: AugSettings, seed: int,
                 grid_dir: Path | None = None, origin: SyntheticPool | None = None) -> None:
        for name, value, allowed in (("selection", settings.selection, SELECTIONS),
                                     ("style_words", settings.style_words, STYLE_WORDS),
                                     ("style_space", settings.style_space, STYLE_SPACES),
                                     ("refresh_from", settings.refresh_from, REFRESH_FROM)):
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
        return [variants[(first + i + j + refresh * n) % len(variants)]
                for i, variants in enumerate(self.prompts[int(y)] for y in labels) for j in range(n)]

    def transform(self, images: torch.Tensor, labels: torch.Tensor, first: int, seed: int, refresh: int = 0,
                  random_picks: torch.Tensor | None = None) -> Refreshed:
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
        candidates = torch.stack([
            ldm.img2img(None, prompts[j::n], strength=strength, num_inference_steps=s.steps,
                        guidance_scale=s.guidance, seed=[seed + i * n + j for i in range(b)], output="latents",
                        latents=source).float()
            for j, strength in enumerate(s.strengths())
        ], dim=1)  # (B, N, 4, h, w)
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
                    first = start + rows.start
                    out = self.transform(images[rows].float() / 255, labels[rows], first,
                                         seed + first * self.settings.candidates, k,
                                         None if picks is None else picks[:, rows])
                    if start == 0 and rows.start == 0 and self.grid_dir is not None:
                        self.save_grid(out, self.grid_dir / f"refresh-{k:03d}.png")
                    return to_uint8(from_ldm_images(out.results, self.input_shape)), labels[rows], sources[rows]

                yield from distributed.gather_chunk(rows, refreshed)
                start += len(images)

        generated = len(self.pool) * self.settings.candidates
        self.pool.replace(chunks(), generated)
        return generated

    def save_grid(self, out: Refreshed, path: Path) -> Path:
        """Rows = pool images; columns = original | N candidates | chosen style | chosen content | result."""
        m = min(GRID_IMAGES, len(out.originals))
        decoded = self.ldm.decode(out.candidates[:m].flatten(0, 1)).unflatten(0, (m, -1))
        rows = [torch.cat([out.originals[i:i + 1].cpu(), decoded[i].cpu(), decoded[i, out.style_pick[i]][None].cpu(),
                           decoded[i, out.content_pick[i]][None].cpu(), out.results[i:i + 1].cpu()])
                for i in range(m)]  # fmt: skip
        n = self.settings.candidates
        label = f"orig|{n} cand|style|content|new"  # fits the grid's label column
        return save_grid(rows, path, [label] + [""] * (m - 1))
