"""Exact resume: a run killed with SIGKILL and resumed writes the same results.jsonl as one that never stopped
(ERM, and DomainFusion with its synthetic pool and latent-distillation RNG) and keeps the lines written before the
kill; checkpoints are atomic."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from resume_checks import keeps_lines, kept_lines

from domainfusion import checkpoint
from domainfusion.data.loaders import InfiniteDataLoader
from domainfusion.errors import UserError
from domainfusion.train import TrainArgs, train

from tiny_ldm import save_tiny_ldm

pytestmark = pytest.mark.usefixtures("one_thread")
TIMING = ("step_time", "mem_gb", "generation_s")


def comparable(records: list[dict]) -> list[dict]:
    """Records without wall-clock fields and runtime-only arguments."""
    out = []
    for r in records:
        r = {k: v for k, v in r.items() if k not in TIMING}
        r["args"] = {k: v for k, v in r["args"].items() if k not in ("resume", "progress", "output_dir")}
        out.append(r)
    return out


def cli_args(args: TrainArgs) -> list[str]:
    flags = [
        "--dataset",
        args.dataset,
        "--algorithm",
        args.algorithm,
        "--test-envs",
        "0",
        "--data-dir",
        args.data_dir,
        "--output-dir",
        args.output_dir,
        "--steps",
        str(args.steps),
        "--checkpoint-freq",
        str(args.checkpoint_freq),
        "--image-size",
        str(args.image_size),
        "--hparams",
        args.hparams,
        "--ldm",
        args.ldm,
        "--num-workers",
        "0",
        "--skip-model-save",
        "--no-progress",
        "--resume",
    ]
    return [sys.executable, "-m", "domainfusion", "train", *flags]


def kill_after_checkpoints(args: TrainArgs, n_lines: int) -> list[str]:
    """Start the run in a subprocess and SIGKILL it at a random moment after `n_lines` checkpoints; returns the
    results.jsonl lines that a resume must keep."""
    results = Path(args.output_dir) / "results.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cli_args(args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline:
        if results.is_file() and len(results.read_text().splitlines()) >= n_lines:
            break
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    time.sleep(random.Random(0).uniform(0.05, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (Path(args.output_dir) / "done").exists(), "the run finished before it was killed"
    return kept_lines(Path(args.output_dir))


@pytest.mark.parametrize("algorithm", ["ERM", "DomainFusion"])
def test_sigkill_then_resume_gives_identical_results(algorithm: str, tiny_folder: Path, tmp_path: Path) -> None:
    ldm = str(save_tiny_ldm(tmp_path / "tiny_ldm")) if algorithm == "DomainFusion" else "embedded"
    hparams = {"lr": 1e-3, "data_augmentation": False, "batch_size": 8}
    if algorithm == "DomainFusion":
        hparams.update(
            synthetic_fraction=0.25,
            img2img_steps=4,
            aug_candidates=2,
            aug_pool_fraction=0.3,
            aug_every_epochs=0.5,
            ld_batch_size=4,
        )
    steps = 150 if algorithm == "ERM" else 60

    def run_args(name: str) -> TrainArgs:
        return TrainArgs(
            dataset="ImageFolder",
            algorithm=algorithm,
            data_dir=str(tiny_folder),
            test_envs=[0],
            output_dir=str(tmp_path / name),
            steps=steps,
            checkpoint_freq=steps // 10,
            image_size=16,
            hparams=json.dumps(hparams),
            ldm=ldm,
            num_workers=0,
            progress=False,
            skip_model_save=True,
        )

    reference = train(run_args("reference"))
    interrupted = run_args("interrupted")
    kept = kill_after_checkpoints(interrupted, n_lines=3)
    resumed = train(TrainArgs(**{**interrupted.__dict__, "resume": True}))
    assert comparable(resumed) == comparable(reference)
    lines = [json.loads(line) for line in (tmp_path / "interrupted" / "results.jsonl").read_text().splitlines()]
    assert comparable(lines) == comparable(reference)
    assert len(kept) >= 2 and keeps_lines(tmp_path / "interrupted", kept)  # resumed, not started over
    if algorithm == "DomainFusion":
        assert reference[-1]["generated_images"] > 0 and reference[-1]["pool_refreshes"] > 3


def test_resume_refuses_changed_arguments(tiny_folder: Path, tmp_path: Path) -> None:
    args = TrainArgs(
        dataset="ImageFolder",
        data_dir=str(tiny_folder),
        output_dir=str(tmp_path / "r"),
        steps=4,
        checkpoint_freq=2,
        image_size=16,
        progress=False,
        skip_model_save=True,
    )
    train(args)
    (tmp_path / "r" / "done").unlink()
    with pytest.raises(UserError, match="cannot resume .*: steps differ"):
        train(TrainArgs(**{**args.__dict__, "steps": 6, "resume": True}))


def tiny_algorithm() -> torch.nn.Module:
    """What a checkpoint saves: weights, an optimiser and a generator of the algorithm's own."""
    algorithm = torch.nn.Module()
    algorithm.net = torch.nn.Linear(3, 2)
    algorithm.optimizer = torch.optim.Adam(algorithm.net.parameters())
    algorithm.gen = torch.Generator().manual_seed(1)
    return algorithm


def test_checkpoint_write_failure_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    algorithm = tiny_algorithm()
    checkpoint.write_checkpoint(tmp_path, 9, algorithm, {})
    saved = {k: v.clone() for k, v in algorithm.state_dict().items()}
    with torch.no_grad():
        algorithm.net.weight.add_(1.0)
    algorithm.gen.manual_seed(2)

    def failing_save_file(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.safetensors.torch, "save_file", failing_save_file)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.write_checkpoint(tmp_path, 19, algorithm, {})
    assert checkpoint.read_state(tmp_path)["step"] == 9
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]  # no temp folder left behind
    monkeypatch.undo()
    checkpoint.restore_checkpoint(tmp_path, algorithm)
    assert all(torch.equal(saved[k], v) for k, v in algorithm.state_dict().items())
    assert torch.equal(algorithm.gen.get_state(), torch.Generator().manual_seed(1).get_state())


def _die_when_the_new_checkpoint_is_renamed_in(out: Path) -> None:
    """A child process that writes a second checkpoint and is killed (os._exit: no handler, no cleanup) between
    moving the old checkpoint aside and renaming the new one in, the worst moment of the replacement."""
    rename = Path.rename

    def rename_or_die(self: Path, target):
        if self.name.endswith(".tmp"):
            os._exit(9)
        return rename(self, target)

    Path.rename = rename_or_die
    checkpoint.write_checkpoint(out, 19, tiny_algorithm(), {})


def test_a_kill_between_the_checkpoint_renames_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    algorithm = tiny_algorithm()
    checkpoint.write_checkpoint(tmp_path, 9, algorithm, {})
    child = multiprocessing.get_context("fork").Process(
        target=_die_when_the_new_checkpoint_is_renamed_in, args=(tmp_path,)
    )
    child.start()
    child.join(60)
    assert child.exitcode == 9
    assert not (tmp_path / "checkpoint").exists()  # the kill came after the old one was moved aside
    assert checkpoint.read_state(tmp_path)["step"] == 9
    fresh = tiny_algorithm()
    with torch.no_grad():
        fresh.net.weight.add_(1.0)
    checkpoint.restore_checkpoint(tmp_path, fresh)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in algorithm.state_dict().items())
    checkpoint.write_checkpoint(tmp_path, 19, algorithm, {})  # the next write replaces it normally
    assert checkpoint.read_state(tmp_path)["step"] == 19
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".tmp")) == ["checkpoint"]


def test_a_checkpoint_with_the_former_random_state_layout_resumes(tmp_path: Path) -> None:
    """Checkpoints written before every rank had its own `rng-rank{r}.safetensors` kept rank 0's tensors in
    rng.safetensors and its python/numpy state in state.json."""
    algorithm = tiny_algorithm()
    scalars = checkpoint.rng_state(algorithm)[1]  # python and numpy
    checkpoint.write_checkpoint(tmp_path, 9, algorithm, {})
    folder = tmp_path / "checkpoint"
    (folder / "rng-rank0.safetensors").rename(folder / "rng.safetensors")
    (folder / "state.json").write_text(json.dumps({**checkpoint.read_state(tmp_path), **scalars}))

    def draws() -> list[float]:
        return [torch.rand(1).item(), torch.rand(1, generator=algorithm.gen).item(), np.random.rand(), random.random()]

    expected = draws()
    draws()
    checkpoint.restore_checkpoint(tmp_path, algorithm)
    assert draws() == expected


@pytest.mark.parametrize("batch_size", [5, 32, 50])
def test_loader_fast_forward_matches_an_uninterrupted_stream(batch_size: int) -> None:
    data = torch.utils.data.TensorDataset(torch.arange(40).float(), torch.arange(40))

    def stream(skip: int, n: int) -> list[list[int]]:
        loader = InfiniteDataLoader(data, None, batch_size, 0, torch.Generator().manual_seed(3), skip_batches=skip)
        it = iter(loader)
        return [next(it)[1].tolist() for _ in range(n)]

    assert stream(0, 7)[4:] == stream(4, 3)
