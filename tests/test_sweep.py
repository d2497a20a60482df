"""Sweep: DomainBed's grid, seeds and folder hashes, job states, launchers, one real parallel local launch, and the
refusals of jobs that cannot run as several data-parallel processes."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from domainfusion.algorithms import ALGORITHMS, register
from domainfusion.algorithms.erm import ERM
from domainfusion.checkpoint import CHECKPOINT
from domainfusion.cli import app
from domainfusion.errors import UserError
from domainfusion.launchers import get_launcher, thread_env
from domainfusion.sweep import (
    DONE,
    INCOMPLETE,
    NOT_LAUNCHED,
    Job,
    all_test_env_combinations,
    make_jobs,
    state_counts,
    sweep,
)
from domainfusion.utils import retired

OTHER = "SweepTestERM"
DUMMY, LOCAL = get_launcher("dummy", {}), get_launcher("local", {})


@pytest.fixture
def two_algorithms():
    """Only ERM is registered; a throwaway subclass gives the grid a second algorithm."""
    register(OTHER)(type(OTHER, (ERM,), {}))
    yield ["ERM", OTHER]
    del ALGORITHMS[OTHER]


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    """DomainBed layout: 3 domains x 2 classes x 6 random 16x16 PNGs."""
    rng = np.random.default_rng(0)
    root = tmp_path / "tiny"
    for domain in ("a", "b", "c"):
        for cls in ("cat", "dog"):
            folder = root / domain / cls
            folder.mkdir(parents=True)
            for k in range(6):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{k}.png")
    return root


def digits_jobs(tmp_path: Path, **kw) -> list[Job]:
    kw = {"n_hparams": 1, "n_trials": 1, "data_dir": "data", "output_dir": tmp_path / "sweep", **kw}
    return make_jobs(["DigitsDG"], ["ERM"], **kw)


def test_all_test_env_combinations():
    assert all_test_env_combinations(4) == [[0], [0, 1], [0, 2], [0, 3], [1], [1, 2], [1, 3], [2], [2, 3], [3]]
    assert len(all_test_env_combinations(3)) == 3 + 3
    with pytest.raises(UserError, match="--single-test-envs"):
        all_test_env_combinations(2)


def test_grid_size_and_order(tmp_path, two_algorithms):
    # DigitsDG has 4 envs: 10 test-env sets (4 singles + 6 pairs) x 2 algorithms x 2 hparams seeds x 3 trials.
    jobs = make_jobs(
        ["DigitsDG"], two_algorithms, n_hparams_from=1, n_hparams=3, n_trials=3, data_dir="data", output_dir=tmp_path
    )
    assert len(jobs) == 120
    keys = [(j.args["trial_seed"], j.args["algorithm"], j.args["test_envs"], j.args["hparams_seed"]) for j in jobs]
    assert keys[:3] == [(0, "ERM", [0], 1), (0, "ERM", [0], 2), (0, "ERM", [0, 1], 1)]
    assert keys[20] == (0, OTHER, [0], 1)
    assert keys[-1] == (2, OTHER, [3], 2)
    assert len({json.dumps(k) for k in keys}) == 120
    single = make_jobs(
        ["DigitsDG"],
        two_algorithms,
        n_hparams_from=1,
        n_hparams=3,
        n_trials=3,
        data_dir="data",
        output_dir=tmp_path,
        single_test_envs=True,
    )
    assert len(single) == 3 * 2 * 4 * 2
    explicit = make_jobs(
        ["DigitsDG"], ["ERM"], n_hparams=2, n_trials=1, data_dir="data", output_dir=tmp_path, test_envs=[[0], [1, 3]]
    )
    assert [j.args["test_envs"] for j in explicit] == [[0], [0], [1, 3], [1, 3]]


def test_image_folder_envs_are_its_subfolders(tmp_path, tiny_folder):
    jobs = make_jobs(["ImageFolder"], ["ERM"], n_hparams=1, n_trials=1, data_dir=tiny_folder, output_dir=tmp_path)
    assert [j.args["test_envs"] for j in jobs] == [[0], [0, 1], [0, 2], [1], [1, 2], [2]]


def test_seed_is_domainbed_seed_hash(tmp_path):
    jobs = make_jobs(["DigitsDG"], ["ERM"], n_hparams=2, n_trials=3, data_dir="data", output_dir=tmp_path)
    job = next(j for j in jobs if (j.args["test_envs"], j.args["hparams_seed"], j.args["trial_seed"]) == ([0, 2], 1, 2))
    expected = int(hashlib.md5(str(("DigitsDG", "ERM", [0, 2], 1, 2)).encode()).hexdigest(), 16) % 2**31
    assert job.args["seed"] == expected
    assert len({j.args["seed"] for j in jobs}) == len(jobs)


def test_output_dir_is_md5_of_args(tmp_path):
    jobs = digits_jobs(tmp_path, n_hparams=2, steps=5)
    for job in jobs:
        args = {k: v for k, v in job.args.items() if k != "output_dir"}
        assert job.output_dir == tmp_path / "sweep" / hashlib.md5(json.dumps(args, sort_keys=True).encode()).hexdigest()
        assert job.args["output_dir"] == str(job.output_dir)
        assert Job(job.args, tmp_path / "sweep").output_dir == job.output_dir  # a job's own args name the same folder
    dirs = [j.output_dir for j in jobs]
    assert len(set(dirs)) == len(jobs) == 20
    assert [j.output_dir for j in digits_jobs(tmp_path, n_hparams=2, steps=5)] == dirs
    # Where a job runs does not rename it; what it computes does.
    assert [j.output_dir for j in digits_jobs(tmp_path, n_hparams=2, steps=5, extra={"device": "cpu"})] == dirs
    assert not set(j.output_dir for j in digits_jobs(tmp_path, n_hparams=2, steps=6)) & set(dirs)


def test_variant_renames_the_job_but_keeps_its_seed(tmp_path):
    (plain,) = digits_jobs(tmp_path, test_envs=[[1]])
    (named,) = digits_jobs(tmp_path, test_envs=[[1]], extra={"variant": "ERM_lr"})
    assert named.args["seed"] == plain.args["seed"] and named.output_dir != plain.output_dir
    assert named.command[named.command.index("--variant") + 1] == "ERM_lr"


def test_command_flags(tmp_path):
    (job,) = digits_jobs(
        tmp_path,
        test_envs=[[1, 2]],
        steps=7,
        data_dir="d",
        extra={"eval_train_in": False, "allow_missing_classes": True, "image_size": None, "device": "auto"},
    )
    assert "device" not in job.args and "image_size" not in job.args  # defaults and None are not part of the job
    assert job.command == [
        sys.executable,
        "-m",
        "domainfusion",
        "train",
        "--dataset",
        "DigitsDG",
        "--algorithm",
        "ERM",
        "--test-envs",
        "1,2",
        "--data-dir",
        "d",
        "--output-dir",
        str(job.output_dir),
        "--hparams-seed",
        "0",
        "--trial-seed",
        "0",
        "--seed",
        str(job.args["seed"]),
        "--steps",
        "7",
        "--holdout-fraction",
        "0.2",
        "--allow-missing-classes",
        "--no-eval-train-in",
        "--resume",
        "--no-progress",
    ]


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"datasets": ["Nope"]}, "known datasets: .*DigitsDG"),
        ({"algorithms": ["Nope"]}, "known algorithms: CDGA, DSI, DSI_TestTime, DomainFusion, .*ERM"),
        ({"hparams": '{"lrr": 1}'}, "unknown hparam"),
        ({"test_envs": [[4]]}, "invalid for DigitsDG"),
        ({"test_envs": [[0, 1, 2, 3]]}, "at least one training environment"),
        ({"extra": {"progress": True}}, "cannot set"),
        ({"n_hparams": 0}, "grid is empty"),
        ({"algorithms": ["ERM", "CDGA"], "extra": {"variant": "ERM_big"}}, "one configuration of one algorithm"),
    ],
)
def test_make_jobs_validates_up_front(tmp_path, kw, message):
    kw = {"datasets": ["DigitsDG"], "algorithms": ["ERM"], "data_dir": "data", "output_dir": tmp_path, **kw}
    with pytest.raises(UserError, match=message):
        make_jobs(kw.pop("datasets"), kw.pop("algorithms"), **kw)


def mark(jobs: list[Job], done: int, incomplete: int) -> None:
    """First `done` jobs finished, next `incomplete` have a folder without `done`."""
    for job in jobs[: done + incomplete]:
        job.output_dir.mkdir(parents=True)
    for job in jobs[:done]:
        (job.output_dir / "done").write_text("done")


def test_states_and_delete_incomplete(tmp_path):
    jobs = digits_jobs(tmp_path, single_test_envs=True)
    mark(jobs, done=1, incomplete=2)
    assert [j.state for j in jobs] == [DONE, INCOMPLETE, INCOMPLETE, NOT_LAUNCHED]
    assert state_counts(jobs) == {DONE: 1, INCOMPLETE: 2, NOT_LAUNCHED: 1}
    assert str(jobs[1]).startswith("Incomplete   DigitsDG ERM test_envs=[1] hparams_seed=0 trial_seed=0 ")
    assert sweep("delete_incomplete", jobs, skip_confirmation=True) == 0
    assert [j.state for j in jobs] == [DONE, NOT_LAUNCHED, NOT_LAUNCHED, NOT_LAUNCHED]
    assert (jobs[0].output_dir / "done").exists()


def test_launch_resumes_incomplete_or_deletes_them_and_dummy_prints_commands(tmp_path, capsys):
    jobs = digits_jobs(tmp_path, single_test_envs=True)
    mark(jobs, done=1, incomplete=1)
    assert sweep("launch", jobs, DUMMY, skip_confirmation=True) == 0
    out = capsys.readouterr().out
    assert "About to launch 3 job(s) (1 incomplete resume from their last checkpoint)" in out
    printed = [line for line in out.splitlines() if line.startswith(shlex.quote(sys.executable))]
    assert printed == [shlex.join(j.command) for j in jobs[1:]] and all(" --resume " in p for p in printed)
    assert [j.state for j in jobs] == [DONE, INCOMPLETE, NOT_LAUNCHED, NOT_LAUNCHED]
    assert sweep("launch", jobs, DUMMY, skip_confirmation=True, delete_incomplete=True) == 0
    assert "after deleting 1 incomplete" in capsys.readouterr().out
    assert [j.state for j in jobs] == [DONE, NOT_LAUNCHED, NOT_LAUNCHED, NOT_LAUNCHED]


def test_launch_asks_first(tmp_path, monkeypatch, capsys):
    jobs = digits_jobs(tmp_path, single_test_envs=True)
    monkeypatch.setattr("builtins.input", lambda _: "n")
    assert sweep("launch", jobs, DUMMY) == 0
    out = capsys.readouterr().out
    assert "About to launch 4 job(s)" in out and "Nothing launched." in out and "--seed" not in out


def test_thread_env_splits_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    assert thread_env(2, cores=2)["OMP_NUM_THREADS"] == "1"
    assert thread_env(3, cores=8)["MKL_NUM_THREADS"] == "2"
    assert thread_env(4, cores=2)["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert thread_env(2, cores=2)["OMP_NUM_THREADS"] == "5"


def read_steps(job: Job) -> list[int]:
    return [json.loads(line)["step"] for line in (job.output_dir / "results.jsonl").read_text().splitlines()]


def test_local_launch_end_to_end(tmp_path, tiny_folder, capsys):
    """Two real train subprocesses in parallel plus one that fails; a second launch re-runs nothing."""
    kw = dict(
        n_hparams=1,
        n_trials=1,
        test_envs=[[0], [1]],
        data_dir=tiny_folder,
        output_dir=tmp_path / "sweep",
        steps=3,
        checkpoint_freq=2,
        extra={"image_size": 16, "num_workers": 0, "device": "cpu"},
    )
    jobs = make_jobs(["ImageFolder"], ["ERM"], **kw)
    bad = Job({**jobs[0].args, "data_dir": str(tmp_path / "missing")}, tmp_path / "sweep")
    assert sweep("launch", [*jobs, bad], LOCAL, n_parallel=2, skip_confirmation=True) == 1
    out = capsys.readouterr().out
    assert "2 of 3 jobs finished, 1 failed." in out
    assert f"{bad.output_dir / 'err.txt'}:\n      error: data folder" in out
    assert "does not exist; pass --data-dir" in " ".join(out.split())  # rich wraps the message at 80 columns
    assert [j.state for j in jobs] == [DONE, DONE] and bad.state == INCOMPLETE
    for job in jobs:
        assert read_steps(job) == [0, 2]
        record = json.loads((job.output_dir / "results.jsonl").read_text().splitlines()[-1])
        assert (record["args"]["seed"], record["args"]["test_envs"]) == (job.args["seed"], job.args["test_envs"])
        assert (job.output_dir / "model.safetensors").exists() and (job.output_dir / "out.txt").exists()

    again = make_jobs(["ImageFolder"], ["ERM"], **kw)
    assert sweep("launch", again, LOCAL, n_parallel=2, skip_confirmation=True) == 0
    assert "Nothing to launch: all 2 jobs are done." in capsys.readouterr().out
    assert [read_steps(j) for j in again] == [[0, 2], [0, 2]]
    # The failed job is incomplete: a new launch resumes (here: retries) it and leaves the finished ones alone.
    assert sweep("launch", [*again, bad], LOCAL, skip_confirmation=True) == 1
    assert "1 incomplete resume from their last checkpoint" in capsys.readouterr().out
    assert [read_steps(j) for j in again] == [[0, 2], [0, 2]]


def test_cli_list_prints_counts(tmp_path):
    jobs = make_jobs(
        ["DigitsDG"], ["ERM"], n_hparams=2, n_trials=1, single_test_envs=True, data_dir="data", output_dir=tmp_path
    )
    mark(jobs, done=2, incomplete=1)
    result = CliRunner().invoke(
        app,
        [
            "sweep",
            "list",
            "--datasets",
            "DigitsDG",
            "--algorithms",
            "ERM",
            "--output-dir",
            str(tmp_path),
            "--n-hparams",
            "2",
            "--n-trials",
            "1",
            "--single-test-envs",
        ],
    )
    assert result.exit_code == 0, result.output
    counts = dict(re.findall(r"^(Done|Incomplete|Not launched|total)\s+(\d+)$", result.output, re.M))
    assert counts == {"Done": "2", "Incomplete": "1", "Not launched": "5", "total": "8"}
    assert result.output.count("DigitsDG ERM test_envs=") == 8


def test_cli_nproc_per_job_prints_torchrun_commands(tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "sweep",
            "launch",
            "--launcher",
            "dummy",
            "--datasets",
            "DigitsDG",
            "--algorithms",
            "ERM",
            "--output-dir",
            str(tmp_path),
            "--n-hparams",
            "1",
            "--n-trials",
            "1",
            "--test-envs",
            "0",
            "--nproc-per-job",
            "2",
            "--skip-confirmation",
        ],
    )
    assert result.exit_code == 0, result.output
    (job,) = digits_jobs(tmp_path, test_envs=[[0]], output_dir=tmp_path)
    assert "with the dummy launcher, 1 at a time, 2 processes each." in result.output
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        f"--log-dir={job.output_dir / 'torchrun'}",
        "--redirects=1:3",
    ]
    assert shlex.join(torchrun + job.command[1:]) in result.output.splitlines()


def checkpointed(job: Job, world_size: int | None, folder: str = CHECKPOINT) -> Job:
    """An incomplete job whose checkpoint was written by `world_size` processes (None: a single process, which
    older checkpoints did not record)."""
    (job.output_dir / folder).mkdir(parents=True)
    state = {"step": 5} if world_size is None else {"step": 5, "world_size": world_size}
    (job.output_dir / folder / "state.json").write_text(json.dumps(state))
    return job


@pytest.mark.parametrize(
    "algorithm, kw, nproc, message",
    [
        ("ERM", {}, 0, "--nproc-per-job must be at least 1, got 0"),
        (
            "DSI",
            {},
            2,
            "--nproc-per-job 2: DSI does not support data-parallel training; sweep it separately with "
            "--nproc-per-job 1",
        ),
        (
            "ERM",
            {"extra": {"device": "cuda:1"}},
            2,
            "--device cuda:1 would put every process on one GPU; use --device cuda",
        ),
        (
            "ERM",
            {"hparams": '{"batch_size": 7}'},
            2,
            "--nproc-per-job 2: job DigitsDG ERM test_envs=.0. hparams_seed=0 "
            "trial_seed=0: batch_size 7 is not divisible by the 2 processes",
        ),
        ("ERM", {"n_hparams": 40}, 4, "batch_size (?!64 )\\d+ is not divisible by the 4 processes"),  # a random draw
    ],
)
def test_jobs_that_cannot_run_as_nproc_processes_are_refused_before_launch(tmp_path, algorithm, kw, nproc, message):
    jobs = make_jobs(
        ["DigitsDG"],
        [algorithm],
        n_trials=1,
        test_envs=[[0]],
        data_dir="data",
        output_dir=tmp_path,
        **{"n_hparams": 1, **kw},
    )
    with pytest.raises(UserError, match=message):
        sweep("launch", jobs, DUMMY, skip_confirmation=True, nproc_per_job=nproc)
    assert all(j.state == NOT_LAUNCHED for j in jobs)


def test_incomplete_jobs_resume_only_with_the_processes_that_checkpointed_them(tmp_path, capsys):
    jobs = digits_jobs(tmp_path, single_test_envs=True)
    checkpointed(jobs[0], None)
    checkpointed(jobs[1], 2, folder=retired(Path(CHECKPOINT)).name)  # left aside by a kill during its replacement
    jobs[2].output_dir.mkdir(parents=True)  # failed before its first checkpoint: starts over with any number
    with pytest.raises(
        UserError,
        match=r"^1 incomplete job\(s\) were checkpointed by 2 process\(es\) and resume only "
        r"with as many; relaunch with --nproc-per-job 2, or pass --delete-incomplete",
    ):
        sweep("launch", jobs, DUMMY, skip_confirmation=True)
    with pytest.raises(UserError, match=r"^2 incomplete job\(s\) were checkpointed by 1 or 2 process\(es\)"):
        sweep("launch", jobs, DUMMY, skip_confirmation=True, nproc_per_job=4)
    assert (jobs[1].output_dir / retired(Path(CHECKPOINT)).name).is_dir()  # looked at, not moved back
    capsys.readouterr()
    assert sweep("launch", jobs, DUMMY, skip_confirmation=True, delete_incomplete=True, nproc_per_job=2) == 0
    assert "after deleting 3 incomplete" in capsys.readouterr().out
    assert [j.state for j in jobs] == [NOT_LAUNCHED] * 4


def test_a_launcher_name_is_not_a_launcher(tmp_path):
    jobs = make_jobs(["RotatedMNIST"], ["ERM"], n_hparams=1, n_trials=1, data_dir="d", output_dir=tmp_path)
    with pytest.raises(TypeError, match=r"launchers.get_launcher\('local', options\)"):
        sweep("launch", jobs, "local")
