"""Data parallelism on CPU (gloo, 2 processes): the gradient average is the full-batch gradient, per-rank RNG
survives a checkpoint, `torchrun ... domainfusion train` reproduces a single-process run with the same global batch,
only rank 0 writes, sharded pool generation (DomainFusion refreshes, CDGA) gives the single-process pools, and a
SIGKILLed 2-rank run resumes to the uninterrupted run's results.

Run as a script under torchrun (`torchrun --nproc_per_node 2 tests/test_ddp.py RUNS_JSON`) it trains each run of
RUNS_JSON (a list of TrainArgs fields) in turn: several runs share one launch.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from resume_checks import keeps_lines, kept_lines
from safetensors.torch import load_file

from domainfusion import distributed
from domainfusion import hparams as registry
from domainfusion.checkpoint import read_state, restore_checkpoint, rng_state, write_checkpoint
from domainfusion.errors import UserError

TIMING = ("step_time", "mem_gb", "generation_s")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    distributed.setup("cpu")
    fn(*args)
    # Leave the group together: a rank tearing gloo down while its peer still talks to it can abort the peer
    # ("terminate called without an active exception").
    distributed.barrier()
    distributed.leave()


def run_ranks(fn: Callable, *args: Any, world: int = 2, timeout: float = 300) -> None:
    """Run fn(*args) in `world` spawned processes joined in one gloo process group on 127.0.0.1; ranks still running
    after `timeout` seconds (a rank waiting in a collective that another one left) are killed and fail the test."""
    context = mp.spawn(_rank_main, args=(world, _free_port(), fn, args), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            raise AssertionError(f"ranks still running after {timeout} s")


def start_torchrun(*args: str, nproc: int = 2) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers (which it starts in sessions of their own, out of reach of killpg)."""
    pids, todo = [], [proc.pid]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        for children in Path(f"/proc/{pid}/task").glob("*/children"):
            todo += [int(c) for c in children.read_text().split()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate()


def torchrun(*args: str, nproc: int = 2, timeout: float = 300) -> None:
    """`torchrun --standalone --nproc_per_node nproc ARGS`; on timeout torchrun and its workers are killed (a hung
    rank would otherwise outlive the test)."""
    proc = start_torchrun(*args, nproc=nproc)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise
    assert proc.returncode == 0, stderr[-4000:]


# ---------------------------------------------------------------- gradient averaging (exact)


class TwoBranch(torch.nn.Module):
    """`extra` scales the outputs of the global batch's first half only, so on rank 1 it gets no gradient at all;
    `unused` never gets one (weight decay would move it if it got a zero gradient instead of None)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.extra = torch.nn.Parameter(torch.ones(3))
        self.unused = torch.nn.Parameter(torch.ones(3))
        self.frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)

    def forward(self, x: torch.Tensor, n_first: int) -> torch.Tensor:
        out = self.lin(x)
        return torch.cat([out[:n_first] * self.extra, out[n_first:]]) if n_first else out


def sgd_steps(out: Path) -> None:
    """Three SGD steps (momentum, weight decay: sensitive to the gradient's scale) on this rank's half of a fixed
    batch of 8; rank 1 starts from other weights, which the broadcast must overwrite. 20-byte buckets give
    [lin.weight], [lin.bias, extra] (extra: no grad on rank 1) and [unused] (no grad anywhere)."""
    torch.manual_seed(distributed.rank())
    algorithm = torch.nn.Module()
    algorithm.net = TwoBranch()
    algorithm.optimizer = torch.optim.SGD(algorithm.net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    algorithm.gen = torch.Generator().manual_seed(7)
    distributed.make_data_parallel(algorithm, seed=0, fresh=True)
    g = torch.Generator().manual_seed(42)
    x, y = torch.randn(8, 4, generator=g), torch.randint(3, (8,), generator=g)
    rows = distributed.shard_rows(8)
    n_first = max(0, min(4, rows.stop) - rows.start)
    with pytest.MonkeyPatch.context() as patch:  # also runs in the test's own process (the single-process reference)
        patch.setattr(distributed, "BUCKET_BYTES", 20)
        for _ in range(3):
            loss = F.cross_entropy(algorithm.net(x[rows], n_first), y[rows])
            algorithm.optimizer.zero_grad()
            loss.backward()
            algorithm.optimizer.step()
    if distributed.world_size() > 1:
        with pytest.raises(UserError, match="batch_size 7 is not divisible by the 2 processes"):
            registry.local_hparams({"batch_size": 7})
        assert registry.local_hparams({"batch_size": 8, "ld_batch_size": 4, "lr": 0.1}) == {
            "batch_size": 4,
            "ld_batch_size": 2,
            "lr": 0.1,
        }
    torch.save(
        {"state": algorithm.net.state_dict(), "draw": torch.rand(2, generator=algorithm.gen)},
        out / f"rank{distributed.rank()}.pt",
    )


def test_gradient_average_equals_the_full_batch_step(tmp_path: Path) -> None:
    single = tmp_path / "single"
    single.mkdir()
    sgd_steps(single)
    run_ranks(sgd_steps, tmp_path)
    reference = torch.load(single / "rank0.pt")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for result in ranks:
        for name, value in reference["state"].items():
            torch.testing.assert_close(result["state"][name], value, rtol=0, atol=1e-6, msg=name)
    assert torch.equal(ranks[0]["state"]["unused"], torch.ones(3))  # skipped by SGD, as in one process
    assert not torch.equal(ranks[0]["state"]["extra"], torch.ones(3))
    assert not torch.equal(ranks[0]["draw"], ranks[1]["draw"])  # each rank has its own random streams


# ---------------------------------------------------------------- chunks made by the ranks together


def chunks_made_together(out: Path) -> None:
    """Chunks of 3 rows (blocks 0:1 and 1:3) and of 1 row (rank 0's block is empty), row i holding 10·i."""
    made, chunks = [], []
    for n in (3, 1):
        rows = distributed.shard_rows(n)

        def make() -> tuple[torch.Tensor]:
            made.append(n)
            return (torch.arange(n)[rows] * 10,)

        chunks += distributed.gather_chunk(rows, make)
    torch.save({"made": made, "chunks": chunks}, out / f"rank{distributed.rank()}.pt")


def test_chunks_made_together_arrive_whole_on_rank_0(tmp_path: Path) -> None:
    run_ranks(chunks_made_together, tmp_path)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert [c[0].tolist() for c in rank0["chunks"]] == [[0, 10, 20], [0]] and rank1["chunks"] == []
    assert rank0["made"] == [3] and rank1["made"] == [3, 1]  # an empty block is not made


# ---------------------------------------------------------------- per-rank RNG in checkpoints


def draws(algorithm: torch.nn.Module) -> list[float]:
    return [
        torch.rand(1).item(),
        torch.rand(1, generator=algorithm.gen).item(),
        float(np.random.rand()),
        random.random(),
    ]


def checkpoint_round_trip(out: Path) -> None:
    algorithm = torch.nn.Module()
    algorithm.net = torch.nn.Linear(2, 2)
    algorithm.optimizer = torch.optim.Adam(algorithm.net.parameters())
    algorithm.gen = torch.Generator().manual_seed(3)
    distributed.make_data_parallel(algorithm, seed=0, fresh=True)
    rngs = distributed.gather_object(rng_state(algorithm))  # as train() does at every checkpoint
    if distributed.is_main():
        write_checkpoint(out, 5, algorithm, {"world_size": 2}, rngs)
    distributed.barrier()
    expected = draws(algorithm)
    draws(algorithm)
    restore_checkpoint(out, algorithm, distributed.rank())
    assert draws(algorithm) == expected
    (out / f"draws{distributed.rank()}.json").write_text(json.dumps(expected))
    from domainfusion.train import TrainArgs, train

    with pytest.raises(UserError, match="DSI does not support data-parallel training"):
        train(TrainArgs(algorithm="DSI", output_dir=str(out / "dsi")))


def test_each_rank_resumes_its_own_random_streams_and_dsi_is_refused(tmp_path: Path) -> None:
    run_ranks(checkpoint_round_trip, tmp_path)
    assert not (tmp_path / "dsi").exists()
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == [
        "model.safetensors",
        "optimizers.pt",
        "rng-rank0.safetensors",
        "rng-rank1.safetensors",
        "state.json",
    ]
    assert read_state(tmp_path) == {"step": 5, "world_size": 2}  # random state only in the per-rank files
    per_rank = [json.loads((tmp_path / f"draws{r}.json").read_text()) for r in range(2)]
    assert all(a != b for a, b in zip(*per_rank))


# ---------------------------------------------------------------- a non-finite loss on one rank


def nan_on_rank1_at_step4(data_dir: Path, out: Path) -> None:
    """ERM whose rank 1 alone gets a NaN batch at step 4 (a checkpoint step; the last checkpoint is step 2); each
    rank writes the error its train() stopped with."""
    from domainfusion.algorithms.erm import ERM
    from domainfusion.train import TrainArgs, train

    real_update = ERM.update
    steps = iter(range(6))

    def update(self: ERM, minibatches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        if next(steps) == 4 and distributed.rank() == 1:
            minibatches = [(torch.full_like(x, float("nan")), y) for x, y in minibatches]
        return real_update(self, minibatches)

    args = TrainArgs(
        dataset="ImageFolder",
        data_dir=str(data_dir),
        test_envs=[0],
        steps=6,
        checkpoint_freq=2,
        image_size=16,
        num_workers=0,
        device="cpu",
        progress=False,
        skip_model_save=True,
        output_dir=str(out),
        hparams='{"batch_size": 8}',
    )
    with pytest.MonkeyPatch.context() as patch, pytest.raises(UserError) as error:
        patch.setattr(ERM, "update", update)
        train(args)
    (out / f"error{distributed.rank()}.txt").write_text(str(error.value))


def test_a_nan_on_one_rank_stops_every_rank_and_keeps_the_last_checkpoint(tiny_folder: Path, tmp_path: Path) -> None:
    """The rank whose loss is finite must not go on into the next gradient all-reduce (where it would wait forever
    for the rank that stopped): both stop at the same step with the same message."""
    out = tmp_path / "run"
    run_ranks(nan_on_rank1_at_step4, tiny_folder, out, timeout=120)
    errors = [(out / f"error{r}.txt").read_text() for r in range(2)]
    assert errors[0] == errors[1] and errors[0].startswith("loss became nan at step 4; lower the learning rate")
    assert read_state(out) == {"step": 2, "world_size": 2}
    assert [json.loads(line)["step"] for line in (out / "results.jsonl").read_text().splitlines()] == [0, 2]
    weights = load_file(str(out / "checkpoint" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())


# ---------------------------------------------------------------- end to end under torchrun


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def comparable(record: dict) -> dict:
    r = {k: v for k, v in record.items() if k not in TIMING + ("world_size",)}
    r["args"] = {k: v for k, v in r["args"].items() if k not in ("output_dir", "resume")}
    return r


def test_torchrun_erm_follows_the_single_process_trajectory(tiny_folder: Path, tmp_path: Path, one_thread) -> None:
    """Both runs train on the same global batch (ranks split each drawn batch), so they differ only in the float
    summation order of the gradient (the mean of two half-batch means, ~1e-7 relative). Adam amplifies that
    noise (it rescales tiny gradient components to ±lr): measured on this task, the loss gap is 1e-6 at step 5,
    1e-4 at step 10 and 7e-4 at step 15, while ranks that do not average gradients are 1.2e-2 apart at step 5 and
    18% at step 15. Hence 3e-3 relative on losses up to step 15 and, at every checkpoint, at most one of the 36
    evaluated images classified differently (one that the noise moves across the decision boundary)."""
    from domainfusion.train import TrainArgs, train

    args = dict(
        dataset="ImageFolder",
        data_dir=str(tiny_folder),
        test_envs=[0],
        steps=16,
        checkpoint_freq=5,
        image_size=16,
        num_workers=0,
        progress=False,
        hparams='{"lr": 0.001, "data_augmentation": false}',
    )
    torchrun(
        "-m",
        "domainfusion",
        "train",
        "--dataset",
        "ImageFolder",
        "--data-dir",
        str(tiny_folder),
        "--test-envs",
        "0",
        "--steps",
        "16",
        "--checkpoint-freq",
        "5",
        "--image-size",
        "16",
        "--num-workers",
        "0",
        "--no-progress",
        "--hparams",
        args["hparams"],
        "--output-dir",
        str(tmp_path / "ddp"),
    )
    single = train(TrainArgs(**args, output_dir=str(tmp_path / "single")))

    lines = (tmp_path / "ddp" / "results.jsonl").read_text().splitlines()
    ddp = [json.loads(line) for line in lines]
    assert [r["step"] for r in ddp] == [r["step"] for r in single] == [0, 5, 10, 15]  # one writer
    assert all(r["world_size"] == 2 for r in ddp) and "world_size" not in single[0]
    sizes = {"in": 10, "out": 2}  # 12 images per domain, holdout 0.2
    for a, b in zip(ddp, single):
        assert a["loss"] == pytest.approx(b["loss"], rel=3e-3), a["step"]
        flips = sum(abs(a[k] - b[k]) * sizes[k.split("_")[1]] for k in a if k.endswith("_acc"))
        assert flips <= 1 + 1e-9, (a["step"], flips)
        assert {k: v for k, v in comparable(a).items() if k != "loss" and not k.endswith("_acc")} == {
            k: v for k, v in comparable(b).items() if k != "loss" and not k.endswith("_acc")
        }
    assert single[-1]["env0_in_acc"] == 1.0 > single[0]["env0_in_acc"]  # a trajectory, not a flat line
    # nothing but rank 0's files, and rank 1's random state in the checkpoint
    assert tree(tmp_path / "ddp") == sorted(tree(tmp_path / "single") + ["checkpoint/rng-rank1.safetensors"])
    assert (
        load_file(str(tmp_path / "ddp" / "model.safetensors")).keys()
        == load_file(str(tmp_path / "single" / "model.safetensors")).keys()
    )


def pool_images(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    manifest = json.loads((root / "manifest.json").read_text())
    shards = [load_file(str(root / f"gen-{manifest['generation']:06d}" / s)) for s in manifest["shards"]]
    return torch.cat([s["images"] for s in shards]), torch.cat([s["sources"] for s in shards])


def test_sharded_generation_gives_the_single_process_pools(tiny_folder: Path, tmp_path: Path, one_thread) -> None:
    """DomainFusion's refreshed pool and CDGA's generated set depend only on the frozen LDM and per-image seeds, so
    the 2-rank runs (each rank generating half of every shard) must end with the single-process pools; image i
    of an img2img call only ever sees its own noise, so at most rounding differs (≤ 1 grey level in uint8)."""
    from domainfusion.train import TrainArgs, train

    from tiny_ldm import save_tiny_ldm

    ldm = str(save_tiny_ldm(tmp_path / "tiny_ldm"))
    common = {"lr": 1e-3, "data_augmentation": False, "batch_size": 8, "synthetic_fraction": 0.25, "img2img_steps": 4}
    hparams = {
        "DomainFusion": {
            **common,
            "aug_candidates": 2,
            "aug_pool_fraction": 0.3,
            "aug_every_epochs": 0.5,
            "ld_batch_size": 4,
        },
        "CDGA": {**common, "cdga_variants": 2},
    }

    def run(algorithm: str, name: str) -> dict:
        return dict(
            dataset="ImageFolder",
            algorithm=algorithm,
            data_dir=str(tiny_folder),
            test_envs=[0],
            steps=6,
            checkpoint_freq=3,
            image_size=16,
            hparams=json.dumps(hparams[algorithm]),
            ldm=ldm,
            num_workers=0,
            progress=False,
            skip_model_save=True,
            output_dir=str(tmp_path / name),
        )

    torchrun(__file__, json.dumps([run("DomainFusion", "df_ddp"), run("CDGA", "cdga_ddp")]))
    for algorithm, name, folder in (("DomainFusion", "df", "pool"), ("CDGA", "cdga", "cdga_pool")):
        single = train(TrainArgs(**run(algorithm, name + "_single")))
        ddp = [json.loads(line) for line in (tmp_path / f"{name}_ddp" / "results.jsonl").read_text().splitlines()]
        assert [r["step"] for r in ddp] == [r["step"] for r in single] == [0, 3, 5]
        for key in ("generated_images", "pool_size", "pool_refreshes"):
            assert ddp[-1][key] == single[-1][key], key
        assert ddp[-1]["generated_images"] > 0 and ddp[-1]["pool_refreshes"] >= (algorithm == "DomainFusion")
        images_ddp, sources_ddp = pool_images(tmp_path / f"{name}_ddp" / folder)
        images_single, sources_single = pool_images(tmp_path / f"{name}_single" / folder)
        assert torch.equal(sources_ddp, sources_single)
        assert (images_ddp.int() - images_single.int()).abs().max() <= 1, name
        assert tree(tmp_path / f"{name}_ddp") == sorted(
            tree(tmp_path / f"{name}_single") + ["checkpoint/rng-rank1.safetensors"]
        )


def test_killed_ddp_run_resumes_to_the_uninterrupted_results(tiny_folder: Path, tmp_path: Path, one_thread) -> None:
    """DomainFusion on 2 ranks, SIGKILLed after its second checkpoint and resumed with the same launch: results.jsonl
    must equal an uninterrupted 2-rank run's (each rank's synthetic-pool and LD generators, the pool and the shared
    loader streams are restored) and keep the lines up to the checkpoint as written before the kill (a restart
    from step 0 would rewrite them); resuming with another number of processes is refused."""
    from domainfusion.train import TrainArgs, train

    from tiny_ldm import save_tiny_ldm

    hp = {
        "lr": 1e-3,
        "data_augmentation": False,
        "batch_size": 8,
        "synthetic_fraction": 0.25,
        "img2img_steps": 4,
        "aug_candidates": 2,
        "aug_pool_fraction": 0.3,
        "aug_every_epochs": 0.5,
        "ld_batch_size": 4,
    }

    def run(name: str, resume: bool = False) -> dict:
        return dict(
            dataset="ImageFolder",
            algorithm="DomainFusion",
            data_dir=str(tiny_folder),
            test_envs=[0],
            steps=24,
            checkpoint_freq=3,
            image_size=16,
            hparams=json.dumps(hp),
            ldm=ldm,
            num_workers=0,
            progress=False,
            skip_model_save=True,
            output_dir=str(tmp_path / name),
            resume=resume,
        )

    ldm = str(save_tiny_ldm(tmp_path / "tiny_ldm"))
    results = tmp_path / "killed" / "results.jsonl"
    proc = start_torchrun(__file__, json.dumps([run("killed", resume=True)]))
    deadline = time.time() + 240
    while not (results.is_file() and len(results.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-4000:]
        time.sleep(0.05)
    time.sleep(random.Random(0).uniform(0.05, 0.3))
    kill_tree(proc)
    assert not (tmp_path / "killed" / "done").exists(), "the run finished before it was killed"
    kept = kept_lines(tmp_path / "killed")
    assert kept
    with pytest.raises(UserError, match="with 1 process\\(es\\): its checkpoint was written by 2"):
        train(TrainArgs(**run("killed", resume=True)))
    torchrun(__file__, json.dumps([run("killed", resume=True), run("reference")]))

    def lines(name: str) -> list[dict]:
        return [comparable(json.loads(line)) for line in (tmp_path / name / "results.jsonl").read_text().splitlines()]

    assert lines("killed") == lines("reference")
    assert keeps_lines(tmp_path / "killed", kept)
    assert len(lines("reference")) == 9 and lines("reference")[-1]["pool_refreshes"] > 3


if __name__ == "__main__":
    from domainfusion.train import TrainArgs, train

    torch.set_num_threads(1)
    for fields in json.loads(sys.argv[1]):
        train(TrainArgs(**fields))
