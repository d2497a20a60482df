"""Launchers on real engines: a local Ray instance and submitit's local executor run the same tiny jobs as the local
launcher, with byte-identical results; failures are counted; a lost Ray task, a killed job and a pre-empted
submitit job end Incomplete or requeued, and resume to the same results, keeping the lines written before."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import make_image_folder
from domainfusion.cli import app
from domainfusion.errors import UserError
from domainfusion.launchers import get_launcher, local_launcher, ray_launcher, slurm_launcher
from domainfusion.sweep import DONE, INCOMPLETE, Job, make_jobs
from resume_checks import keeps_lines, kept_lines

TIMING = ("step_time", "mem_gb")


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory):
    """Two 20-step jobs (records at steps 0, 5, 10, 15, 19), long enough to be interrupted after a checkpoint."""
    root = tmp_path_factory.mktemp("launchers")
    folder = make_image_folder(root / "tiny", {d: ["cat", "dog"] for d in ("d0", "d1", "d2")})

    def jobs(name: str) -> list[Job]:
        return make_jobs(["ImageFolder"], ["ERM"], n_hparams=1, n_trials=1, test_envs=[[0], [1]], data_dir=folder,
                         output_dir=root / name, steps=20, checkpoint_freq=5,
                         hparams={"batch_size": 8, "lr": 1e-3, "resnet18": True},
                         extra={"image_size": 16, "num_workers": 0, "device": "cpu", "eval_train_in": False})

    return root, jobs


@pytest.fixture(scope="module")
def reference(grid) -> list[list[dict]]:
    """The local launcher's records for the two jobs."""
    _, jobs = grid
    reference_jobs = jobs("local")
    assert local_launcher(reference_jobs, 2) == 0
    return [records(job) for job in reference_jobs]


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")  # a dev dependency: present wherever the test suite is installed
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def records(job: Job) -> list[dict]:
    """results.jsonl without wall-clock fields and the output folder (which names the sweep)."""
    out = []
    for line in (job.output_dir / "results.jsonl").read_text().splitlines():
        record = {k: v for k, v in json.loads(line).items() if k not in TIMING}
        record["args"] = {k: v for k, v in record["args"].items() if k != "output_dir"}
        out.append(record)
    return out


def broken(job: Job) -> Job:
    """The same job with a flag value the command line rejects: it fails at once, before loading torch."""
    return Job({**job.args, "checkpoint_freq": "often"}, job.output_dir.parent)


def train_pid(job: Job) -> int | None:
    """The pid of the job's `domainfusion train` process, found by its --output-dir."""
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if proc.name.isdigit() and b"train" in argv and str(job.output_dir).encode() in argv:
            return int(proc.name)
    return None


def parent(pid: int) -> int:
    return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])


def after_first_checkpoint(job: Job, running: Future) -> tuple[int, list[str]]:
    """Wait until the job has written a checkpoint and is still training; return its train pid and the results.jsonl
    lines that its resumption must keep."""
    deadline = time.time() + 240
    while time.time() < deadline and not running.done():
        pid = train_pid(job)
        kept = kept_lines(job.output_dir) if pid else []
        if kept:
            assert job.state == INCOMPLETE, "the job finished before it could be interrupted"
            return pid, kept
        time.sleep(0.05)
    raise AssertionError(f"{job.output_dir} never wrote a checkpoint while running")


def test_launcher_choice_and_options_are_checked(tmp_path, monkeypatch):
    """First in the file: before the module's Ray instance starts (ray_launcher would use it)."""
    with pytest.raises(UserError, match="unknown launcher 'sge'; choose one of local, dummy, ray, slurm"):
        get_launcher("sge", {})
    with pytest.raises(UserError, match="the local launcher takes no --ray-address, --slurm-partition$"):
        get_launcher("local", {"ray_address": "auto", "slurm_partition": "gpu", "timeout_min": None})
    with pytest.raises(UserError, match="whole number on SLURM"):
        slurm_launcher([Job({"x": 1}, tmp_path)], 1, gpus_per_job=0.5, cluster="local")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(UserError, match="cannot reach the Ray cluster .--ray-address auto.: Could not find any running"):
        ray_launcher([], 1, ray_address="auto")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if ray were not installed
    with pytest.raises(UserError, match=r"the ray launcher needs ray: pip install 'domainfusion\[cluster\]'"):
        ray_launcher([], 1)
    result = CliRunner().invoke(app, ["sweep", "launch", "--launcher", "slurm", "--ray-address", "auto",
                                      "--output-dir", str(tmp_path), "--skip-confirmation"])
    assert result.exit_code != 0 and "the slurm launcher takes no --ray-address" in str(result.exception)


def test_ray_matches_local_counts_failures_and_resumes_lost_tasks(grid, reference, ray_instance, capsys):
    _, jobs = grid
    lost, finished = jobs("ray")
    bad = broken(finished)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(ray_launcher, [lost, finished, bad], 3, max_retries=0)
        pid, kept = after_first_checkpoint(lost, running)
        os.kill(parent(pid), signal.SIGKILL)  # the Ray worker: its task is lost (as with a dead node)...
        os.kill(pid, signal.SIGKILL)  # ...and so is the training process (a crashed worker's child would linger)
        assert running.result() == 2
    out = capsys.readouterr().out
    assert "1 of 3 jobs finished, 2 failed." in out and "failed (Ray task lost: " in out
    assert "Invalid value for '--checkpoint-freq'" in out
    assert (lost.state, finished.state, bad.state) == (INCOMPLETE, DONE, INCOMPLETE)
    assert records(finished) == reference[1]

    assert ray_launcher([lost], 1) == 0  # a new launch resumes the lost job from its last checkpoint
    assert lost.state == DONE and records(lost) == reference[0] and keeps_lines(lost.output_dir, kept)


def test_submitit_local_matches_local_requeues_preempted_and_resumes_killed(grid, reference, capsys):
    root, jobs = grid
    preempted, killed = jobs("slurm")
    bad = broken(killed)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(slurm_launcher, [preempted, killed, bad], 3, cluster="local", timeout_min=60)
        pid, kept_preempted = after_first_checkpoint(preempted, running)
        os.kill(parent(pid), signal.SIGUSR2)  # SLURM's pre-emption signal to the submitit task: checkpoint, requeue
        pid, kept_killed = after_first_checkpoint(killed, running)
        os.kill(pid, signal.SIGKILL)  # a job killed outright
        assert running.result() == 2
    out = capsys.readouterr().out
    assert "1 of 3 jobs finished, 2 failed." in out and "failed (exit -9)" in out
    logs = " ".join(p.read_text() for p in (root / "slurm" / "submitit").glob("*_log.*"))
    assert "SIGUSR2 on" in logs and "this job is preempted" in logs and "Requeued job" in logs
    assert (preempted.state, killed.state, bad.state) == (DONE, INCOMPLETE, INCOMPLETE)
    assert records(preempted) == reference[0] and keeps_lines(preempted.output_dir, kept_preempted)

    assert slurm_launcher([killed], 1, cluster="local", timeout_min=60) == 0
    assert killed.state == DONE and records(killed) == reference[1] and keeps_lines(killed.output_dir, kept_killed)
