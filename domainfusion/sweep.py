"""Sweeps with DomainBed's semantics: the same job grid, seeds and md5-named output folders as
`domainbed/scripts/sweep.py`, so a sweep folder can be resumed, listed and fed to `domainfusion results`.

A job is one `domainfusion train --resume` run, as one process or as N data-parallel ones (`--nproc-per-job`): how
many processes is the launcher's business, not the job's, so it stays out of the folder hash. Its state is read from
disk (a `done` marker means finished, a folder without one means interrupted or failed), which is what makes `launch`
safe to re-run after a crash: interrupted jobs continue from their last checkpoint (unlike DomainBed, which can only
delete and rerun them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from . import hparams as hparams_registry
from .algorithms import algorithm_class
from .checkpoint import CHECKPOINT
from .config_fields import ResultFree, result_free_fields
from .data import dataset_class
from .errors import UserError
from .train import TrainArgs
from .utils import retired, seed_hash

DONE = "Done"
INCOMPLETE = "Incomplete"
NOT_LAUNCHED = "Not launched"
STATES = (DONE, INCOMPLETE, NOT_LAUNCHED)
COMMANDS = ("launch", "delete_incomplete", "list")

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainArgs) if f.default is not dataclasses.MISSING}
# Set by the grid itself; everything else in TrainArgs may come through `extra`, except the invocation flags that
# `Job.command` sets (every job resumes, logs go to files; `overwrite` is never needed: launch skips finished jobs).
_GRID_FIELDS = {
    "dataset",
    "algorithm",
    "test_envs",
    "data_dir",
    "output_dir",
    "hparams",
    "hparams_seed",
    "trial_seed",
    "seed",
    "steps",
    "checkpoint_freq",
    "holdout_fraction",
}
_NEVER = _GRID_FIELDS | set(result_free_fields(TrainArgs, ResultFree.INVOCATION))
EXTRA_FIELDS = tuple(f.name for f in dataclasses.fields(TrainArgs) if f.name not in _NEVER)
# Where a job runs does not change its result, so these stay out of the folder hash: a sweep started on one machine
# can be resumed with another --device or --num-workers and still find its finished jobs.
PLACEMENT_FIELDS = result_free_fields(TrainArgs, ResultFree.PLACEMENT)


def all_test_env_combinations(n: int) -> list[list[int]]:
    """Every single test env and every pair (DomainBed's default grid); needs n >= 3 to leave a training env."""
    if n < 3:
        raise UserError(f"pairs of test environments need at least 3 environments, got {n}; pass --single-test-envs")
    combos = []
    for i in range(n):
        combos.append([i])
        combos.extend([i, j] for j in range(i + 1, n))
    return combos


def num_environments(dataset: str, data_dir: str | Path, allow_missing_classes: bool = False) -> int:
    """Fixed-environment datasets know their count; plain image folders are scanned (sorted sub-folders)."""
    cls = dataset_class(dataset)
    if cls.ENVIRONMENTS:
        return len(cls.ENVIRONMENTS)
    from .data.image_folder import scan_domains

    subdir = getattr(cls, "SUBDIR", "")
    domains, _ = scan_domains(Path(data_dir) / subdir if subdir else Path(data_dir), allow_missing_classes)
    return len(domains)


def job_hash(args: dict[str, Any]) -> str:
    """DomainBed's folder name: md5 of the sorted-key JSON of the train args, minus where the job runs (output_dir,
    device, num_workers: `PLACEMENT_FIELDS`)."""
    keyed = {k: v for k, v in args.items() if k not in PLACEMENT_FIELDS}
    return hashlib.md5(json.dumps(keyed, sort_keys=True).encode("utf-8")).hexdigest()


class Job:
    """One training run of the sweep: its train args, its folder, its `domainfusion train` command."""

    def __init__(self, args: dict[str, Any], sweep_dir: str | Path) -> None:
        self.output_dir = Path(sweep_dir) / job_hash(args)
        self.args = {**args, "output_dir": str(self.output_dir)}

    @property
    def command(self) -> list[str]:
        """Flags in TrainArgs order; booleans typer-style (`--x`/`--no-x`), lists comma-joined, None omitted."""
        cmd = [sys.executable, "-m", "domainfusion", "train"]
        for f in dataclasses.fields(TrainArgs):
            value = self.args.get(f.name)
            flag = "--" + f.name.replace("_", "-")
            if value is None:
                continue
            if isinstance(value, bool):
                cmd.append(flag if value else "--no-" + flag[2:])
            elif isinstance(value, list):
                cmd += [flag, ",".join(str(v) for v in value)]
            else:
                cmd += [flag, str(value)]
        return cmd + ["--resume", "--no-progress"]

    @property
    def device(self) -> str:
        return self.args.get("device", _DEFAULTS["device"])

    @property
    def name(self) -> str:
        """What the job trains, as people read it in lists and failure reports."""
        a = self.args
        return (
            f"{a['dataset']} {a['algorithm']} test_envs={a['test_envs']} hparams_seed={a['hparams_seed']} "
            f"trial_seed={a['trial_seed']}"
        )

    @property
    def state(self) -> str:
        """Read from disk every time, so it reflects runs that finished since the job list was made."""
        if (self.output_dir / "done").exists():
            return DONE
        return INCOMPLETE if self.output_dir.exists() else NOT_LAUNCHED

    def __str__(self) -> str:
        return f"{self.state:<12} {self.name} {self.output_dir}"


class Launcher(Protocol):
    """Where a sweep's jobs run (`launchers.get_launcher` builds one from its name and options): runs `jobs`,
    `n_parallel` at a time and each as `nproc_per_job` processes, and returns how many failed. Launchers depend on
    `Job`; the sweep knows them only through this interface, handed in by its caller."""

    @property
    def name(self) -> str: ...

    def __call__(self, jobs: Sequence[Job], n_parallel: int, nproc_per_job: int) -> int: ...


def make_jobs(
    datasets: Sequence[str],
    algorithms: Sequence[str],
    *,
    n_hparams_from: int = 0,
    n_hparams: int = 20,
    n_trials: int = 3,
    data_dir: str | Path,
    output_dir: str | Path,
    steps: int | None = None,
    checkpoint_freq: int | None = None,
    holdout_fraction: float = 0.2,
    single_test_envs: bool = False,
    test_envs: Sequence[Sequence[int]] | None = None,
    hparams: str | dict | None = None,
    extra: dict[str, Any] | None = None,
) -> list[Job]:
    """DomainBed's grid (trial seed, dataset, algorithm, test envs, hparams seed), validated before anything runs.

    `extra` sets other TrainArgs fields for every job; values equal to TrainArgs' defaults are dropped so that
    spelling out a default does not rename the job folders.
    """
    if not datasets or not algorithms:
        raise UserError("a sweep needs at least one dataset and one algorithm")
    if n_trials < 1 or n_hparams <= n_hparams_from:
        raise UserError(
            f"the grid is empty: need --n-trials >= 1 (got {n_trials}) and --n-hparams-from < --n-hparams "
            f"(got {n_hparams_from} and {n_hparams})"
        )
    extra = dict(extra or {})
    unknown = sorted(set(extra) - set(EXTRA_FIELDS))
    if unknown:
        raise UserError(f"sweep cannot set {unknown} per job; settable: {', '.join(EXTRA_FIELDS)}")
    extra = {k: v for k, v in extra.items() if v is not None and v != _DEFAULTS[k]}
    if isinstance(hparams, dict):
        hparams = json.dumps(hparams, sort_keys=True)
    if extra.get("variant") is not None and len(algorithms) != 1:
        raise UserError(
            f"--variant names one configuration of one algorithm; got {len(algorithms)} algorithms "
            f"({', '.join(algorithms)}): launch each variant with its own --algorithms"
        )
    for algorithm in algorithms:
        algorithm_class(algorithm)

    n_envs = {}
    for dataset in datasets:
        n_envs[dataset] = num_environments(dataset, data_dir, extra.get("allow_missing_classes", False))
        for algorithm in algorithms:
            hparams_registry.resolve_hparams(algorithm, dataset, 0, 0, hparams)
        if test_envs is not None:
            _check_test_envs(test_envs, n_envs[dataset], dataset)

    jobs = []
    for trial_seed in range(n_trials):
        for dataset in datasets:
            if test_envs is not None:
                env_grid = [list(t) for t in test_envs]
            elif single_test_envs:
                env_grid = [[i] for i in range(n_envs[dataset])]
            else:
                env_grid = all_test_env_combinations(n_envs[dataset])
            for algorithm in algorithms:
                for envs in env_grid:
                    for hparams_seed in range(n_hparams_from, n_hparams):
                        args: dict[str, Any] = {
                            "dataset": dataset,
                            "algorithm": algorithm,
                            "test_envs": envs,
                            "holdout_fraction": holdout_fraction,
                            "hparams_seed": hparams_seed,
                            "data_dir": str(data_dir),
                            "trial_seed": trial_seed,
                            "seed": seed_hash(dataset, algorithm, envs, hparams_seed, trial_seed),
                        }
                        optional = {"steps": steps, "checkpoint_freq": checkpoint_freq, "hparams": hparams}
                        args.update({k: v for k, v in optional.items() if v is not None})
                        args.update(extra)
                        jobs.append(Job(args, output_dir))
    return jobs


def _check_test_envs(test_envs: Sequence[Sequence[int]], n: int, dataset: str) -> None:
    for envs in test_envs:
        if not envs or len(set(envs)) != len(envs) or not all(0 <= e < n for e in envs) or len(envs) >= n:
            raise UserError(
                f"--test-envs {list(envs)} is invalid for {dataset}: use distinct indices in 0..{n - 1} and leave "
                f"at least one training environment"
            )


def checkpoint_world_size(out: Path) -> int | None:
    """How many processes wrote the run's checkpoint (None without one). Read only, also where a kill left it aside
    (`retired`): a job that another launch is running may be replacing it right now."""
    for folder in (out / CHECKPOINT, retired(out / CHECKPOINT)):
        try:
            return json.loads((folder / "state.json").read_text()).get("world_size", 1)
        except FileNotFoundError:
            continue
    return None


def check_nproc(jobs: Sequence[Job], nproc: int, resume: bool) -> None:
    """Refuse, before anything runs, jobs that cannot train as `nproc` data-parallel processes (`train` would stop
    each of them for the same reason, one job at a time): an algorithm that is not data parallel, one GPU named for
    every process, a batch the processes cannot split and, when incomplete jobs resume, a checkpoint written by
    another number of processes."""
    if nproc < 1:
        raise UserError(f"--nproc-per-job must be at least 1, got {nproc}")
    for job in jobs if nproc > 1 else ():
        a = job.args
        if not getattr(algorithm_class(a["algorithm"]), "DATA_PARALLEL", True):
            raise UserError(
                f"--nproc-per-job {nproc}: {a['algorithm']} does not support data-parallel training; "
                "sweep it separately with --nproc-per-job 1"
            )
        if ":" in job.device:
            raise UserError(
                f"--nproc-per-job {nproc} with --device {job.device} would put every process on one "
                "GPU; use --device cuda (each process takes the GPU of its local rank)"
            )
        hp = hparams_registry.resolve_hparams(
            a["algorithm"], a["dataset"], a["hparams_seed"], a["trial_seed"], a.get("hparams")
        )
        try:
            hparams_registry.local_hparams(hp, nproc)
        except UserError as e:
            raise UserError(f"--nproc-per-job {nproc}: job {job.name}: {e}") from None
    if resume:
        written = {job.output_dir: checkpoint_world_size(job.output_dir) for job in jobs if job.state == INCOMPLETE}
        other = sorted({w for w in written.values() if w not in (None, nproc)})
        if other:
            n = sum(w in other for w in written.values())
            raise UserError(
                f"{n} incomplete job(s) were checkpointed by {' or '.join(map(str, other))} process(es) "
                f"and resume only with as many; relaunch with --nproc-per-job {other[0]}, or pass "
                "--delete-incomplete to start them over"
            )


def state_counts(jobs: Sequence[Job]) -> dict[str, int]:
    counts = dict.fromkeys(STATES, 0)
    for job in jobs:
        counts[job.state] += 1
    return counts


def format_counts(counts: dict[str, int]) -> str:
    rows = [("state", "jobs"), *((s, str(n)) for s, n in counts.items()), ("total", str(sum(counts.values())))]
    return "\n".join(f"{name:<14}{n:>6}" for name, n in rows)


def _confirm(question: str) -> bool:
    try:
        answer = input(f"{question} (y/n) ")
    except EOFError:
        print("\nno answer on stdin; pass --skip-confirmation to run without asking")
        return False
    return answer.strip().lower().startswith("y")


def normalize_command(command: str) -> str:
    """Accept both the CLI spelling (delete-incomplete) and DomainBed's (delete_incomplete)."""
    normalized = command.replace("-", "_")
    if normalized not in COMMANDS:
        raise UserError(f"unknown sweep command {command!r}; choose one of launch, delete-incomplete, list")
    return normalized


def sweep(
    command: str,
    jobs: Sequence[Job],
    launcher: Launcher | None = None,
    n_parallel: int = 1,
    skip_confirmation: bool = False,
    delete_incomplete: bool = False,
    nproc_per_job: int = 1,
) -> int:
    """Run a sweep command; returns the number of failed jobs (0 for list, delete_incomplete, or a cancelled launch).

    `launch` runs every job that is not done with `launcher` (e.g. `launchers.get_launcher("ray", {"cpus_per_job":
    4})`); interrupted ones resume from their last checkpoint, unless `delete_incomplete` removes them first so they
    start over. Each job trains as `nproc_per_job` data-parallel processes.
    """
    if launcher is not None and not callable(launcher):
        raise TypeError(
            f"launcher must be a Launcher, e.g. launchers.get_launcher({launcher!r}, options), got "
            f"{type(launcher).__name__}"
        )
    command = normalize_command(command)
    if command == "launch" and launcher is None:
        raise TypeError("sweep('launch', ...) needs a launcher: launchers.get_launcher(name, options)")
    if n_parallel < 1:
        raise UserError(f"--n-parallel must be at least 1, got {n_parallel}")

    if command == "list":
        for job in jobs:
            print(job)
    print(format_counts(state_counts(jobs)))
    if command == "list":
        return 0
    incomplete = [j for j in jobs if j.state == INCOMPLETE]

    if command == "delete_incomplete":
        if not incomplete:
            print("No incomplete jobs.")
            return 0
        print(f"About to delete {len(incomplete)} incomplete job folder(s).")
        if skip_confirmation or _confirm("Are you sure?"):
            _delete(incomplete)
        else:
            print("Nothing deleted.")
        return 0

    to_launch = [j for j in jobs if j.state != DONE]
    check_nproc(to_launch, nproc_per_job, resume=not delete_incomplete)
    if not to_launch:
        print(f"Nothing to launch: all {len(jobs)} jobs are done.")
        return 0
    if incomplete and delete_incomplete:
        how = f" (after deleting {len(incomplete)} incomplete, which start over)"
    elif incomplete:
        how = f" ({len(incomplete)} incomplete resume from their last checkpoint)"
    else:
        how = ""
    processes = f", {nproc_per_job} processes each" if nproc_per_job > 1 else ""
    print(
        f"About to launch {len(to_launch)} job(s){how} with the {launcher.name} launcher, {n_parallel} at a time"
        f"{processes}."
    )
    if not (skip_confirmation or _confirm("Are you sure?")):
        print("Nothing launched.")
        return 0
    if incomplete and delete_incomplete:
        _delete(incomplete)
    return launcher(to_launch, n_parallel, nproc_per_job)


def _delete(jobs: Sequence[Job]) -> None:
    for job in jobs:
        shutil.rmtree(job.output_dir)
    print(f"Deleted {len(jobs)} incomplete job folder(s).")
