"""The synthetic pool: labelled generated images on disk, shared by DomainFusion's online augmentation, CDGA and DSI.

Layout: `manifest.json` + `gen-XXXXXX/shard-XXXXX.safetensors` (uint8 images, labels, sources), one folder per
generation. Writing the next generation beside the current one and then switching `manifest.json` atomically means a
kill mid-write leaves the previous pool loadable, and RAM never holds more than one shard. Only this module knows the
layout; a checkpoint keeps a pool through `link_into` / `restore`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from .. import distributed
from ..images import to_uint8
from ..utils import atomic_write_text, publish_dir, seed_hash
from .loaders import SeededItems

SHARD_SIZE = 1024
Chunk = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # uint8 images (B, C, H, W), labels (B,), source ids (B,)


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
    def create(cls, root: str | Path, chunks: Iterable[Chunk], generated: int = 0) -> SyntheticPool:
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
            rows.append(self._open(self.manifest["shards"][shard]).get_slice("images")[offset : offset + 1])
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

    def link_into(self, folder: Path) -> None:
        """Hard-link the current generation (and a copy of the manifest) into `folder`: a snapshot that costs no
        space and survives later refreshes, which delete the generation they replace."""
        generation = f"gen-{self.manifest['generation']:06d}"
        (folder / generation).mkdir(parents=True)
        for shard in self.manifest["shards"]:
            os.link(self.root / generation / shard, folder / generation / shard)
        shutil.copyfile(self.root / "manifest.json", folder / "manifest.json")

    @staticmethod
    def restore(snapshot: Path, root: Path) -> None:
        """Make `root` the pool `link_into` saved in `snapshot` (hard links again), whatever `root` holds now."""
        if root.exists():
            shutil.rmtree(root)
        shutil.copytree(snapshot, root, copy_function=os.link)


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
    atomic_write_text(
        root / "manifest.json", json.dumps(dict(manifest, generation=generation, shards=names, size=size), indent=2)
    )


def _flush(folder: Path, names: list[str], pending: list[Chunk], n: int) -> list[Chunk]:
    """Write the first n pending images as the next shard; return the rest."""
    images, labels, sources = (torch.cat(parts) for parts in zip(*pending))
    name = f"shard-{len(names):05d}.safetensors"
    save_file(
        {"images": images[:n].contiguous(), "labels": labels[:n].long(), "sources": sources[:n].long()},
        str(folder / name),
    )
    names.append(name)
    return [(images[n:], labels[n:], sources[n:])] if n < len(images) else []


def subset_chunks(datasets: list[Dataset], fraction: float, seed: int, num_workers: int = 0) -> Iterator[Chunk]:
    """A seeded random `fraction` (at least one image) of the concatenated datasets, read chunk by chunk by
    `num_workers` loader processes (0: this one), in order.

    These are the images handed to an LDM (the pool's first generation, CDGA's and DSI's inputs). Each is read with
    torch's RNG seeded by (seed, its index) (`SeededItems`), so a dataset's random training augmentation (DomainBed's
    crops, flips and colour jitter on image folders) draws the same on every run and in every worker, and never
    from the global RNG: the generated images, and so a whole generative run, are a function of the run's seed.
    """
    total = sum(len(d) for d in datasets)
    k = max(1, round(fraction * total))
    chosen = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:k].sort().values
    parts = chosen.split(SHARD_SIZE)
    batches = ([(i, seed_hash(seed, i)) for i in part.tolist()] for part in parts)  # lazily: DomainNet has 586k
    # A generator of its own: even creating the loader's iterator would otherwise draw from the global RNG.
    loader = DataLoader(
        SeededItems(_Uint8Images(ConcatDataset(datasets))),
        batch_sampler=batches,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )
    for part, (images, labels) in zip(parts, loader):
        yield images, labels, part.clone()


class _Uint8Images(Dataset):
    """(uint8 image, int label) items: the pool's format, converted where the image is read (a worker ships a
    quarter of a float image's bytes)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x, y = self.dataset[index]
        return to_uint8(x), int(y)
