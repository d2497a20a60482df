"""Launchers on real engines: a local Ray instance and submitit's local executor run the same tiny jobs as the local
launcher, with byte-identical results; failures are counted; a lost Ray task, a killed job and a pre-empted
submitit job end Incomplete or requeued, and resume to the same results, keeping the lines written before.

Jobs of two data-parallel processes (gloo on CPU): the local launcher's (torchrun) follow single-process jobs with the
same global batch, within test_ddp.py's tolerance; Ray (torchrun in a task) and submitit (two tasks, one rank each, a
pre-empted job requeued) give the local launcher's records exactly.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import pytest
from resume_checks import keeps_lines, kept_lines
from typer.testing import CliRunner

from domainfusion import launchers
from domainfusion.cli import app
from domainfusion.errors import UserError
from domainfusion.launchers import (
    SubmititJob,
    get_launcher,
    job_resources,
    local_launcher,
    ray_launcher,
    slurm_launcher,
)
from domainfusion.sweep import DONE, INCOMPLETE, Job, make_jobs, sweep

from conftest import make_image_folder

TIMING = ("step_time", "mem_gb")
# test_ddp.py's torchrun task (global batch 32, no augmentation, 16 steps), for which its tolerance was measured.
DDP_RUN = {"steps": 16, "hparams": {"lr": 1e-3, "data_augmentation": False}}


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory):
    """Two 20-step jobs (records at steps 0, 5, 10, 15, 19), long enough to be interrupted after a checkpoint."""
    root = tmp_path_factory.mktemp("launchers")
    folder = make_image_folder(root / "tiny", {d: ["cat", "dog"] for d in ("d0", "d1", "d2")})

    def jobs(name: str, steps: int = 20, hparams: dict | None = None) -> list[Job]:
        return make_jobs(
            ["ImageFolder"],
            ["ERM"],
            n_hparams=1,
            n_trials=1,
            test_envs=[[0], [1]],
            data_dir=folder,
            output_dir=root / name,
            steps=steps,
            checkpoint_freq=5,
            hparams=hparams or {"batch_size": 8, "lr": 1e-3, "resnet18": True},
            extra={"image_size": 16, "num_workers": 0, "device": "cpu", "eval_train_in": False},
        )

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


def train_pids(job: Job) -> list[int]:
    """The pids of the job's `domainfusion train` processes (one per rank), found by their --output-dir."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if proc.name.isdigit() and b"train" in argv and str(job.output_dir).encode() in argv:
            pids.append(int(proc.name))
    return pids


def parent(pid: int) -> int:
    return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])


def interrupt_after_first_checkpoint(
    running: Future, *interrupts: tuple[Job, Callable[[list[int]], None]], processes: int = 1
) -> list[list[str]]:
    """Call each job's interrupt with the pids of its `processes` train processes once it has written a checkpoint
    and they still run; return, per job, the results.jsonl lines that its resumption must keep. All jobs are watched
    at once: a job waited for only after another one's interruption may finish meanwhile (it did so on CI)."""
    kept: dict[int, list[str]] = {}
    deadline = time.time() + 600  # only bounds a hang: a loaded CI machine starts Ray workers slowly
    while time.time() < deadline and not running.done() and len(kept) < len(interrupts):
        for i, (job, interrupt) in enumerate(interrupts):
            if i in kept:
                continue
            pids = train_pids(job)
            lines = kept_lines(job.output_dir) if len(pids) == processes else []
            if lines:
                assert job.state == INCOMPLETE, f"{job.output_dir} finished before it could be interrupted"
                interrupt(pids)
                kept[i] = lines
        time.sleep(0.05)
    never = [str(job.output_dir) for i, (job, _) in enumerate(interrupts) if i not in kept]
    assert not never, f"{', '.join(never)} never wrote a checkpoint while running"
    return [kept[i] for i in range(len(interrupts))]


def kill(*pids: int, sig: signal.Signals = signal.SIGKILL) -> None:
    for pid in pids:
        os.kill(pid, sig)


def test_launcher_choice_and_options_are_checked(tmp_path, monkeypatch):
    """First in the file: before the module's Ray instance starts (ray_launcher would use it)."""
    with pytest.raises(UserError, match="unknown launcher 'sge'; choose one of local, dummy, ray, slurm"):
        get_launcher("sge", {})
    with pytest.raises(UserError, match="the local launcher takes no --ray-address, --slurm-partition$"):
        get_launcher("local", {"ray_address": "auto", "slurm_partition": "gpu", "timeout_min": None})
    with pytest.raises(UserError, match="whole number on SLURM"):
        slurm_launcher([Job({"x": 1}, tmp_path)], 1, gpus_per_job=0.5, cluster="local")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(
        UserError, match="cannot reach the Ray cluster .--ray-address auto.: Could not find any running"
    ):
        ray_launcher([], 1, ray_address="auto")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if ray were not installed
    with pytest.raises(UserError, match=r"the ray launcher needs ray: pip install 'domainfusion\[cluster\]'"):
        ray_launcher([], 1)
    result = CliRunner().invoke(
        app,
        [
            "sweep",
            "launch",
            "--launcher",
            "slurm",
            "--ray-address",
            "auto",
            "--output-dir",
            str(tmp_path),
            "--skip-confirmation",
        ],
    )
    assert result.exit_code != 0 and "the slurm launcher takes no --ray-address" in str(result.exception)


def test_ray_matches_local_counts_failures_and_resumes_lost_tasks(grid, reference, ray_instance, capsys):
    _, jobs = grid
    lost, finished = jobs("ray")
    bad = broken(finished)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(ray_launcher, [lost, finished, bad], 3, max_retries=0)
        # the Ray worker is killed: its task is lost (as with a dead node); and so is the training process (a crashed
        # worker's child would linger)
        (kept,) = interrupt_after_first_checkpoint(running, (lost, lambda pids: kill(parent(pids[0]), *pids)))
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
        kept_preempted, kept_killed = interrupt_after_first_checkpoint(
            running,
            # SLURM's pre-emption signal to the submitit task: checkpoint, requeue
            (preempted, lambda pids: kill(parent(pids[0]), sig=signal.SIGUSR2)),
            (killed, lambda pids: kill(*pids)),
        )  # a job killed outright
        assert running.result() == 2
    out = capsys.readouterr().out
    assert "1 of 3 jobs finished, 2 failed." in out and "failed (exit -9)" in out
    logs = " ".join(p.read_text() for p in (root / "slurm" / "submitit").glob("*_log.*"))
    assert "SIGUSR2 on" in logs and "this job is preempted" in logs and "Requeued job" in logs
    assert (preempted.state, killed.state, bad.state) == (DONE, INCOMPLETE, INCOMPLETE)
    assert records(preempted) == reference[0] and keeps_lines(preempted.output_dir, kept_preempted)

    assert slurm_launcher([killed], 1, cluster="local", timeout_min=60) == 0
    assert killed.state == DONE and records(killed) == reference[1] and keeps_lines(killed.output_dir, kept_killed)


# ---------------------------------------------------------------- jobs of several data-parallel processes


def test_resources_of_multi_process_jobs():
    """By default one CPU per process and, on GPUs, one GPU per process; the processes of a job share its CPUs
    evenly and cannot share GPUs."""
    assert job_resources(1, None, None, on_gpus=True) == (1, 1)
    assert job_resources(1, None, 0.25, on_gpus=True) == (1, 0.25)  # one process: a GPU share, as before
    assert job_resources(4, None, None, on_gpus=True) == (4, 4)
    assert job_resources(4, 8, None, on_gpus=False) == (8, 0)
    with pytest.raises(
        UserError,
        match="--cpus-per-job 6 cannot be shared by the 4 processes of a job; give a multiple of --nproc-per-job 4",
    ):
        job_resources(4, 6, None, on_gpus=False)
    with pytest.raises(
        UserError,
        match="--gpus-per-job 1 does not fit --nproc-per-job 2: each process trains on a "
        "GPU of its own; give 2 .or 0 to train on CPUs., or leave it out",
    ):
        job_resources(2, None, 1, on_gpus=True)


def test_local_launcher_refuses_more_processes_than_gpus(tmp_path, monkeypatch):
    jobs = make_jobs(
        ["DigitsDG"],
        ["ERM"],
        n_hparams=1,
        n_trials=1,
        test_envs=[[0]],
        data_dir="data",
        output_dir=tmp_path,
        extra={"device": "cuda"},
    )
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    with pytest.raises(
        UserError,
        match="--nproc-per-job 2 trains each job on 2 GPUs, but this machine has 1 "
        "visible; lower --nproc-per-job or pass --device cpu",
    ):
        local_launcher(jobs, 1, 2)
    assert not jobs[0].output_dir.exists()


def test_each_slurm_task_exports_the_torch_distributed_variables_of_its_rank(tmp_path, monkeypatch):
    """Under SLURM's variables for task 1 of 2 (as srun sets them), the task runs the plain train command as rank 1
    of 2, with the first node as master, a port that both tasks derive alike from the job id, variables the
    submitting shell exported replaced, and every GPU of the node left visible (LOCAL_RANK picks one)."""
    (job,) = make_jobs(
        ["DigitsDG"], ["ERM"], n_hparams=1, n_trials=1, test_envs=[[0]], data_dir="data", output_dir=tmp_path
    )
    monkeypatch.setattr(launchers, "run_job", lambda job, command, env, rank=0: (command, dict(os.environ), rank))
    slurm = {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "42",
        "SLURM_ARRAY_JOB_ID": "41",
        "SLURM_ARRAY_TASK_ID": "1",
        "SLURM_NTASKS": "2",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_JOB_NODELIST": "gpu[07]",
        "CUDA_VISIBLE_DEVICES": "0,1",
        "RANK": "5",
        "WORLD_SIZE": "8",
    }
    before = dict(os.environ)
    ran = {}
    for rank in (0, 1):
        with mock.patch.dict(os.environ, {**slurm, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)}):
            os.environ.pop("MASTER_PORT", None)
            ran[rank] = SubmititJob(job, {"OMP_NUM_THREADS": "4"}, nproc=2)()
    (command, env, rank) = ran[1]
    assert command == job.command and rank == 1
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR")} == {
        "RANK": "1",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "gpu07",
    }
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1" and 20000 <= int(env["MASTER_PORT"]) <= 60000
    assert ran[0][2] == 0 and ran[0][1]["RANK"] == "0" and ran[0][1]["MASTER_PORT"] == env["MASTER_PORT"]
    assert os.environ == before


def test_slurm_submits_a_job_of_n_processes_as_n_tasks_on_one_node(tmp_path, monkeypatch):
    """The sbatch script submitit writes (captured by a stand-in sbatch): 2 tasks of 4 CPUs and 2 GPUs on one node
    for a job of 2 processes on `--device cuda` with 8 CPUs, an array of 2 jobs one at a time."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\n")
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path / "sbatch.sh"}\necho "Submitted batch job 42"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr("submitit.helpers.as_completed", lambda submitted, poll_frequency: iter(()))  # no waiting
    jobs = make_jobs(
        ["DigitsDG"],
        ["ERM"],
        n_hparams=1,
        n_trials=1,
        test_envs=[[0], [1]],
        data_dir="data",
        output_dir=tmp_path / "sweep",
        extra={"device": "cuda"},
    )
    slurm_launcher(jobs, 1, 2, cpus_per_job=8)
    script = (tmp_path / "sbatch.sh").read_text().splitlines()
    for line in (
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=2",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --array=0-1%1",
    ):
        assert line in script


def comparable(record: dict) -> dict:
    """What a data-parallel job shares exactly with a single-process one: all but losses, accuracies, world_size."""
    return {k: v for k, v in record.items() if k != "world_size" and k != "loss" and not k.endswith("_acc")}


def files(job: Job) -> list[str]:
    """The job folder's files, but for torchrun's logs of ranks other than 0."""
    return sorted(
        str(p.relative_to(job.output_dir))
        for p in job.output_dir.rglob("*")
        if p.relative_to(job.output_dir).parts[0] != "torchrun"
    )


@pytest.fixture(scope="module")
def two_process_runs(grid) -> tuple[list[Job], list[Job], Job, str]:
    """The DDP_RUN jobs launched locally as single processes, then through `sweep` as 2-process jobs (both at once,
    so two torchruns rendezvous side by side) with a third that fails; and what that launch printed."""
    _, jobs = grid
    single, two = jobs("single", **DDP_RUN), jobs("two", **DDP_RUN)
    bad = Job({**two[0].args, "data_dir": str(two[0].output_dir.parent / "missing")}, two[0].output_dir.parent)
    assert local_launcher(single, 2) == 0
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        failed = sweep(
            "launch", [*two, bad], get_launcher("local", {}), n_parallel=2, skip_confirmation=True, nproc_per_job=2
        )
    assert failed == 1, printed.getvalue()
    return single, two, bad, printed.getvalue()


def test_local_two_process_jobs_follow_single_process_jobs(two_process_runs):
    """test_ddp.py's tolerance for torchrun against one process with the same global batch: losses within 3e-3
    relative, at most one evaluated image classified differently per checkpoint, everything else equal."""
    single, two, bad, printed = two_process_runs
    sizes = {"in": 10, "out": 2}  # 12 images per domain, holdout 0.2
    for one_job, ddp_job in zip(single, two):
        one, ddp = records(one_job), records(ddp_job)
        assert [r["step"] for r in ddp] == [r["step"] for r in one] == [0, 5, 10, 15]
        assert all(r["world_size"] == 2 for r in ddp) and "world_size" not in one[0]
        for a, b in zip(ddp, one):
            assert a["loss"] == pytest.approx(b["loss"], rel=3e-3), a["step"]
            flips = sum(abs(a[k] - b[k]) * sizes[k.split("_")[1]] for k in a if k.endswith("_acc"))
            assert flips <= 1 + 1e-9, (a["step"], flips)
            assert comparable(a) == comparable(b)
        assert one[-1]["loss"] < one[0]["loss"] / 5  # a trajectory, not a flat line
        # rank 0 writes what a single process does, plus rank 1's random state; rank 1 logs under torchrun/
        assert files(ddp_job) == sorted(files(one_job) + ["checkpoint/rng-rank1.safetensors"])
        assert len(list(ddp_job.output_dir.glob("torchrun/*/attempt_0/1/stderr.log"))) == 1
    assert "with the local launcher, 2 at a time, 2 processes each." in printed
    assert "2 of 3 jobs finished, 1 failed." in printed
    # the failure quoted is rank 0's message, not the report torchrun prints after it
    assert f"{bad.output_dir / 'err.txt'}:\n      error: data folder" in printed and "=====" not in printed


def test_an_interrupted_runner_stops_torchrun_and_its_workers(grid):
    """Ctrl-C, Ray's cancel and submitit's requeue interrupt `run_job` in the runner only: torchrun must get SIGTERM,
    which it passes on to its workers (they run in sessions of their own: after a SIGKILL to torchrun they would go
    on training without the job's lock). The runner is a process of its own that gets a real SIGINT, as from a
    terminal: a signal to this test process could be delayed or left unseen by what earlier tests left running."""
    _, jobs = grid
    job = jobs("interrupted", **DDP_RUN)[0]
    args = {k: v for k, v in job.args.items() if k != "output_dir"}
    # A shell starts background commands with SIGINT ignored, and Python then installs no handler of its own (a CI
    # script started with `&` left the runner deaf to the signal): restore the terminal's default first.
    runner = (
        "import json, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from domainfusion.launchers import job_command, run_job; "
        "from domainfusion.sweep import Job; job = Job(json.loads(sys.argv[1]), sys.argv[2]); "
        "run_job(job, job_command(job, 2), {})"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", runner, json.dumps(args), str(job.output_dir.parent)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 600
    while len(train_pids(job)) < 3:  # torchrun and its two workers
        assert proc.poll() is None and time.time() < deadline, "the job ended before torchrun and both workers ran"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait() != 0 and b"KeyboardInterrupt" in proc.stderr.read()
    assert train_pids(job) == [] and job.state == INCOMPLETE


def test_submitit_local_runs_two_tasks_per_job_and_requeues_them(grid, two_process_runs):
    """A 2-task job pre-empted after a checkpoint: SLURM signals every task, rank 0's checkpoints and requeues the
    job, rank 1's leaves it to rank 0; the requeued tasks resume to the local launcher's 2-process records."""
    root, jobs = grid
    reference = two_process_runs[1][0]
    preempted = jobs("slurm2", **DDP_RUN)[0]
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(slurm_launcher, [preempted], 1, 2, cluster="local", timeout_min=60)
        (kept,) = interrupt_after_first_checkpoint(
            running, (preempted, lambda pids: kill(*map(parent, pids), sig=signal.SIGUSR2)), processes=2
        )
        assert running.result() == 0
    logs = " ".join(p.read_text() for p in (root / "slurm2" / "submitit").glob("*_log.*"))
    assert "this job is preempted" in logs and "Requeued job" in logs
    assert "Not checkpointing nor requeuing since I am a slave (procid=1)" in logs
    assert preempted.state == DONE and records(preempted) == records(reference)
    assert keeps_lines(preempted.output_dir, kept)
    assert files(preempted) == sorted(files(reference) + ["err-rank1.txt", "launch-rank1.lock", "out-rank1.txt"])


def test_ray_runs_a_two_process_job_under_torchrun(grid, two_process_runs, ray_instance):
    _, jobs = grid
    job = jobs("ray2", **DDP_RUN)[1]
    assert ray_launcher([job], 1, 2) == 0  # the task takes both CPUs of the local instance
    assert records(job) == records(two_process_runs[1][1])
