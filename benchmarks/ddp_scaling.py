"""Data-parallel scaling on CPU: `domainfusion train` with 1 process vs 2 (torchrun, gloo), same global batch.

Both runs train ERM on DigitsDG-offline (held-out env 3, optdigits, the smallest evaluation) with identical
arguments; the machine's cores are split evenly between the processes (OMP_NUM_THREADS = cores / processes), so the
comparison is "one process using every core" against "data parallel over the same cores". Reported: training
steps/s (from results.jsonl's step_time, which excludes evaluation), total wall time (start-up, data loading and the
two evaluations included) and the final held-out accuracy (the same global batch gives the same trajectory, up to
float rounding). Then the gradient average itself (`distributed.average_gradients`) with its buckets of
`BUCKET_BYTES` (what training uses), with one bucket for all gradients and with one bucket per parameter, on the MNIST
CNN's and ResNet-18's gradients, 2 gloo processes. Usage:

    .venv/bin/python benchmarks/ddp_scaling.py --steps 100
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from domainfusion import distributed

from common import REPO, write_report


def train_run(nproc: int, steps: int, out: Path, data_dir: str) -> dict:
    """One `domainfusion train` launch (plain for 1 process, torchrun for more); its last record and wall time."""
    launcher = (
        [sys.executable, "-m", "domainfusion"]
        if nproc == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "domainfusion",
        ]
    )
    cmd = launcher + [
        "train",
        "--dataset",
        "DigitsDG",
        "--algorithm",
        "ERM",
        "--test-envs",
        "3",
        "--data-dir",
        data_dir,
        "--steps",
        str(steps),
        "--checkpoint-freq",
        str(steps),
        "--no-eval-train-in",
        "--skip-model-save",
        "--no-progress",
        "--output-dir",
        str(out),
    ]
    threads = max(1, (os.cpu_count() or 1) // nproc)
    print("+", shlex.join(cmd), f"(OMP_NUM_THREADS={threads})", flush=True)
    start = time.time()
    subprocess.run(
        cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, check=True, stdout=subprocess.DEVNULL
    )
    wall = time.time() - start
    last = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
    return {
        "nproc": nproc,
        "threads": threads,
        "wall_s": wall,
        "steps_per_s": 1 / last["step_time"],
        "test_acc": last["env3_in_acc"],
        "loss": last["loss"],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _time_allreduce(rank: int, port: int, reps: int, results: Path) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    distributed.setup("cpu")
    from domainfusion.models.networks import Featurizer

    used = distributed.BUCKET_BYTES
    rows = []
    for name, shape, hp in (
        ("MNIST CNN", (3, 32, 32), {}),
        ("ResNet-18", (3, 224, 224), {"resnet18": True, "resnet_dropout": 0.0}),
    ):
        params = list(Featurizer(shape, hp).parameters())
        for p in params:
            p.grad = torch.randn_like(p)
        timings = {}
        for label, bucket_bytes in (("used", used), ("one", float("inf")), ("per-param", 1)):
            distributed.BUCKET_BYTES = bucket_bytes
            distributed.average_gradients(params)  # warm-up
            dist.barrier()
            start = time.perf_counter()
            for _ in range(reps):
                distributed.average_gradients(params)
            timings[label] = (time.perf_counter() - start) / reps * 1000
        rows.append(
            {"model": name, "tensors": len(params), "mb": sum(p.numel() for p in params) * 4 / 2**20, **timings}
        )
    if rank == 0:
        results.write_text(json.dumps(rows))


def allreduce_timings(reps: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "allreduce.json"
        mp.spawn(_time_allreduce, args=(_free_port(), reps, path), nprocs=2, join=True)
        return json.loads(path.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--reps", type=int, default=20, help="all-reduce repetitions per measurement")
    p.add_argument("--name", default="ddp-scaling")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [train_run(n, a.steps, Path(tmp) / f"n{n}", a.data_dir) for n in (1, 2)]
    reduce_rows = allreduce_timings(a.reps)
    base = runs[0]
    body = (
        f"ERM on DigitsDG-offline (test env 3), {a.steps} steps, global batch 64 per domain (3 domains); "
        "evaluation at steps 0 and last.\n\n"
        "| processes | threads each | steps/s | speed-up | wall s | test acc |\n|---|---|---|---|---|---|\n"
    )
    body += "".join(
        f"| {r['nproc']} | {r['threads']} | {r['steps_per_s']:.2f} | "
        f"{r['steps_per_s'] / base['steps_per_s']:.2f}× | {r['wall_s']:.1f} | {r['test_acc']:.4f} |\n"
        for r in runs
    )
    body += (
        f"\nGradient average, 2 gloo processes, one thread each (ms per call); buckets of "
        f"{distributed.BUCKET_BYTES / 2**20:g} MiB are what training uses:\n\n"
        "| model | tensors | MiB | bucketed (used) | one bucket | one per parameter |\n|---|---|---|---|---|---|\n"
    )
    body += "".join(
        f"| {r['model']} | {r['tensors']} | {r['mb']:.1f} | {r['used']:.2f} | {r['one']:.2f} | {r['per-param']:.2f} |\n"
        for r in reduce_rows
    )
    print(body)
    write_report(a.name, shlex.join([sys.executable, *sys.argv]), body)


if __name__ == "__main__":
    main()
