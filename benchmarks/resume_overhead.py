"""What exact resume costs: checkpoint write time and size, restore time, and the loader fast-forward on resume.

For each model it measures one training step, one checkpoint write (weights, optimisers, every RNG, pool hard
links; temp folder + fsync + rename) and one restore, and reports the write's share of training time at a few
checkpoint frequencies. The loader fast-forward (re-drawing the index stream of the batches already seen, no image
loaded) is timed against the step count it skips. Usage:

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/resume_overhead.py
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from method_profile import build

from domainfusion import hparams as registry
from domainfusion.algorithms import algorithm_class
from domainfusion.checkpoint import CHECKPOINT, restore_checkpoint, write_checkpoint
from domainfusion.data import get_dataset
from domainfusion.data.loaders import InfiniteDataLoader, split_dataset
from domainfusion.utils import seed_everything, seed_hash

from common import write_report

FREQS = (1, 10, 100, 300)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, page cache)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def folder_bytes(folder: Path, skip: str | None = None) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and (skip is None or skip not in p.parts))


def erm(dataset: str, input_shape: tuple[int, int, int], num_classes: int, overrides: dict):
    hp = {**registry.default_hparams("ERM", dataset), **overrides}
    seed_everything(0)
    return algorithm_class("ERM")(input_shape, num_classes, 3, hp), hp


def measure(name: str, make, batch_shape: tuple[int, ...], num_classes: int, repeats: int, out: Path) -> dict:
    algorithm, hp = make()
    g = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.rand(hp["batch_size"], *batch_shape, generator=g),
            torch.randint(num_classes, (hp["batch_size"],), generator=g),
        )
        for _ in range(3)
    ]
    step = timed(lambda: algorithm.update(batches), repeats)
    write = timed(lambda: write_checkpoint(out, 0, algorithm, {}), 3)
    fresh, _ = make()
    restore = timed(lambda: restore_checkpoint(out, fresh), 3)
    return {
        "name": name,
        "params": sum(p.numel() for p in algorithm.parameters() if p.requires_grad),
        "step_s": step,
        "write_s": write,
        "restore_s": restore,
        "bytes": folder_bytes(out / CHECKPOINT, skip="pool"),
        "pool_bytes": folder_bytes(out / CHECKPOINT / "pool") if (out / CHECKPOINT / "pool").exists() else 0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--skip-resnet50", action="store_true")
    a = p.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows.append(
            measure(
                "ERM, MNIST CNN (DigitsDG, 32 px, batch 3×64)",
                lambda: erm("DigitsDG", (3, 32, 32), 10, {}),
                (3, 32, 32),
                10,
                10,
                tmp / "cnn",
            )
        )
        for arch in ("resnet18",) + (() if a.skip_resnet50 else ("resnet50",)):
            rows.append(
                measure(
                    f"ERM, {arch} (PACS-sized, 224 px, batch 3×32)",
                    lambda: erm("PACS", (3, 224, 224), 7, {"resnet18": arch == "resnet18"}),
                    (3, 224, 224),
                    7,
                    1,
                    tmp / arch,
                )
            )
        dataset = get_dataset("DigitsDG", a.data_dir, [1], registry.default_hparams("DomainFusion", "DigitsDG"))
        in_splits = [split_dataset(env, int(len(env) * 0.2), seed_hash(0, i))[1] for i, env in enumerate(dataset)]
        out = tmp / "df"
        rows.append(
            measure(
                "DomainFusion, MNIST CNN + embedded LDM + pool (DigitsDG, batch 3×64)",
                lambda: build("DomainFusion", dataset, in_splits, [0, 2, 3], out, {}),
                (3, 32, 32),
                10,
                5,
                out,
            )
        )

    ds = get_dataset("DigitsDG", a.data_dir, [1], registry.default_hparams("ERM", "DigitsDG"))[0]
    skips = []
    for n in (0, 1_000, 5_000, 50_000):
        start = time.perf_counter()
        next(iter(InfiniteDataLoader(ds, None, 64, 0, torch.Generator().manual_seed(0), skip_batches=n)))
        skips.append((n, time.perf_counter() - start))

    lines = [
        "| model | trainable params | step | checkpoint write | restore | checkpoint size (pool links) | "
        + " | ".join(f"write / train time at every {f}" for f in FREQS)
        + " |",
        "|---|---|---|---|---|---|" + "---|" * len(FREQS),
    ]
    for r in rows:
        shares = " | ".join(f"{100 * r['write_s'] / (f * r['step_s'] + r['write_s']):.2f}%" for f in FREQS)
        pool = f" (+{r['pool_bytes'] / 2**20:.2f} MiB hard-linked pool)" if r["pool_bytes"] else ""
        lines.append(
            f"| {r['name']} | {r['params'] / 1e6:.2f} M | {r['step_s']:.3f} s | {r['write_s']:.3f} s | "
            f"{r['restore_s']:.3f} s | {r['bytes'] / 2**20:.1f} MiB{pool} | {shares} |"
        )
    skip_lines = "\n".join(f"| {n:,} | {s:.3f} s |" for n, s in skips)
    body = (
        "Checkpoint = weights + buffers (safetensors), optimiser state, every RNG, hard links to the pool's current "
        "shards, state.json; built in a temp folder, fsynced, renamed. Sizes exclude the pool: its shards are hard "
        "links (no copy; the disk holds one generation while the run and the checkpoint share it). Means of 3 writes "
        "and 3 restores after a warm-up.\n\n" + "\n".join(lines) + "\n\n"
        "Fast-forward on resume: the loader re-draws the index stream of the batches already seen (no image is "
        "loaded); time to the first batch of one DigitsDG-offline environment's loader (batch 64):\n\n"
        "| batches skipped | time to first batch |\n|---|---|\n" + skip_lines + "\n"
    )
    write_report("resume-overhead", shlex.join([sys.executable, *sys.argv]), body)


if __name__ == "__main__":
    main()
