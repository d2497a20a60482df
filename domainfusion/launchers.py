"""Sweep launchers: where the jobs of a sweep run. Each is `(jobs, n_parallel, **options) -> number failed`.

Every launcher runs the same thing, `run_job`: the job's `domainfusion train --resume` subprocess with its logs in the
job folder. So a job behaves the same under any launcher, and anything that stops a job early (Ctrl-C, a lost Ray
node, a SLURM pre-emption) leaves it Incomplete, to be resumed from its last checkpoint by the next launch (or by the
engine's own retry/requeue). Scheduling is left to the engines: a thread pool here, Ray's resource scheduler, SLURM.
Ray and submitit are imported inside their launchers, so the core package does not depend on them.
"""

from __future__ import annotations

import fcntl
import functools
import importlib
import inspect
import os
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable, Mapping, Sequence

from tqdm import tqdm

from .errors import UserError
from .sweep import DONE, Job, thread_env

CLUSTER_EXTRA = "pip install 'domainfusion[cluster]'"
Outcome = int | str  # a return code, or what happened to a task that never returned one


def run_job(job: Job, env: Mapping[str, str]) -> int:
    """Run the job's command (stdout/stderr to out.txt/err.txt in its folder) with `env` over this process's variables.

    The job folder's `launch.lock` is held for the whole run and inherited by the training process, so a second
    runner of the same job (a concurrent launch of the same sweep, or an engine's retry while the process of a crashed
    worker still runs) waits instead of training in the same folder; it then finds the job done or resumes it.
    """
    job.output_dir.mkdir(parents=True, exist_ok=True)
    with open(job.output_dir / "launch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if job.state == DONE:
            return 0
        with open(job.output_dir / "out.txt", "w") as out, open(job.output_dir / "err.txt", "w") as err:
            return subprocess.run(job.command, stdout=out, stderr=err, env={**os.environ, **env},
                                  stdin=subprocess.DEVNULL, pass_fds=(lock.fileno(),)).returncode


def _tail(path: Path, n: int = 3) -> list[str]:
    """The end of a job's stderr: a traceback's exception line or the wrapped `error:` message of a UserError."""
    if not path.exists():
        return ["(missing: the job never started)"]
    lines = [line.rstrip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-n:] or ["(empty)"]


def summarize(jobs: Sequence[Job], outcomes: Iterable[tuple[Job, Outcome]]) -> int:
    """Consume (job, outcome) pairs as jobs end, with a progress bar; print the failures with their stderr's end.

    Returns the number of failed jobs: any outcome but return code 0.
    """
    failed: list[tuple[Job, Outcome]] = []
    with tqdm(total=len(jobs), unit="job", desc="sweep", file=sys.stderr) as bar:
        for job, outcome in outcomes:
            if outcome != 0:
                failed.append((job, outcome))
                bar.set_postfix(failed=len(failed))
            bar.update()
    print(f"{len(jobs) - len(failed)} of {len(jobs)} jobs finished, {len(failed)} failed.")
    for job, outcome in failed:
        err = job.output_dir / "err.txt"
        why = f"exit {outcome}" if isinstance(outcome, int) else outcome
        print(f"  failed ({why}): {job.args['dataset']} {job.args['algorithm']} "
              f"test_envs={job.args['test_envs']} hparams_seed={job.args['hparams_seed']} "
              f"trial_seed={job.args['trial_seed']}\n    {err}:")
        print("\n".join("      " + line for line in _tail(err)))
    return len(failed)


def _require(module: str, launcher: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"the {launcher} launcher needs {module}: {CLUSTER_EXTRA}") from None


def local_launcher(jobs: Sequence[Job], n_parallel: int) -> int:
    """Run jobs as subprocesses on this machine, `n_parallel` at a time, CPU threads split evenly between them."""
    env = thread_env(n_parallel)
    pool = ThreadPoolExecutor(max_workers=n_parallel)
    try:
        futures = {pool.submit(run_job, job, env): job for job in jobs}
        return summarize(jobs, ((futures[f], f.result()) for f in as_completed(futures)))
    finally:
        # On Ctrl-C start nothing new; running jobs (same process group, same SIGINT) stop and stay INCOMPLETE.
        pool.shutdown(wait=True, cancel_futures=True)


def dummy_launcher(jobs: Sequence[Job], n_parallel: int) -> int:
    """Print the commands instead of running them (to inspect a sweep, or to hand them to another scheduler)."""
    for job in jobs:
        print(shlex.join(job.command))
    return 0


def ray_launcher(
    jobs: Sequence[Job],
    n_parallel: int,
    *,
    cpus_per_job: int = 1,
    gpus_per_job: float | None = None,
    ray_address: str | None = None,
    max_retries: int = 3,
) -> int:
    """One Ray task per job, reserving `cpus_per_job` CPUs and `gpus_per_job` GPUs (fractions allowed).

    Connects to the cluster at `ray_address` ('auto', 'ray://head:10001', ...) or, without one, to the cluster named
    by RAY_ADDRESS or a new local instance; a Ray session that is already initialised in this process is used as is.
    `gpus_per_job=None` means 1 if the cluster has GPUs, else 0. At most
    `n_parallel` tasks are in flight; Ray runs as many of them as the free resources allow. A task whose worker or
    node dies is retried up to `max_retries` times (safe: the command resumes, and the job lock in `run_job` keeps a
    retry from racing a still-running process); a job that fails by itself (non-zero exit) is not retried.
    """
    ray = _require("ray", "ray")
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=ray_address)
        except ConnectionError as error:
            raise UserError(f"cannot reach the Ray cluster (--ray-address {ray_address}): {error}") from None
    try:
        if gpus_per_job is None:
            gpus_per_job = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        task = ray.remote(run_job).options(num_cpus=cpus_per_job, num_gpus=gpus_per_job, max_retries=max_retries)
        return summarize(jobs, _ray_outcomes(ray, task, jobs, n_parallel, thread_env(1, cores=cpus_per_job)))
    finally:
        if started:
            ray.shutdown()


def _ray_outcomes(ray: ModuleType, task: Any, jobs: Sequence[Job], n_parallel: int,
                  env: Mapping[str, str]) -> Iterable[tuple[Job, Outcome]]:
    """Ray's pattern for bounding pending tasks: submit up to `n_parallel`, `ray.wait` for one, submit the next."""
    queue = list(reversed(jobs))
    running: dict[Any, Job] = {}
    try:
        while queue or running:
            while queue and len(running) < n_parallel:
                job = queue.pop()
                running[task.remote(job, env)] = job
            (ref,), _ = ray.wait(list(running), num_returns=1)
            job = running.pop(ref)
            try:
                outcome: Outcome = ray.get(ref)
            except ray.exceptions.RayError as error:
                outcome = f"Ray task lost: {type(error).__name__}"
            yield job, outcome
    finally:
        for ref in running:  # Ctrl-C: KeyboardInterrupt in the tasks, whose subprocess.run kills the training runs
            ray.cancel(ref)


class SubmititJob:
    """One sweep job as a submitit callable that SLURM can pre-empt and requeue.

    On pre-emption or timeout submitit calls `checkpoint()` and requeues what it returns: the same job, whose
    `--resume` command continues from the last checkpoint. submitit recognises checkpointable callables by this
    method, so the class need not subclass `submitit.helpers.Checkpointable` (which would import submitit here).
    """

    def __init__(self, job: Job, env: Mapping[str, str]) -> None:
        self.job = job
        self.env = dict(env)

    def __call__(self) -> int:
        return run_job(self.job, self.env)

    def checkpoint(self) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(SubmititJob(self.job, self.env))


def slurm_launcher(
    jobs: Sequence[Job],
    n_parallel: int,
    *,
    cpus_per_job: int = 1,
    gpus_per_job: float | None = None,
    slurm_partition: str | None = None,
    timeout_min: int = 24 * 60,
    cluster: str = "slurm",
) -> int:
    """Submit the jobs as one SLURM job array through submitit, `n_parallel` running at once, and wait for them.

    Each array task gets `cpus_per_job` CPUs and `gpus_per_job` GPUs (default 0) for `timeout_min` minutes; a task
    that is pre-empted or times out is requeued by submitit and resumes (up to 3 timeouts). submitit's files go to
    `<sweep folder>/submitit`. `cluster="local"` runs the same tasks with submitit's local executor (for tests; it
    starts them all at once). The SLURM jobs outlive this process: if it is stopped, `sweep list` still shows them.
    """
    submitit = _require("submitit", "slurm")
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise UserError("the slurm launcher submits with sbatch, which is not on PATH here; launch the sweep from a "
                        "SLURM login node")
    gpus = gpus_per_job or 0
    if gpus != int(gpus):
        raise UserError(f"--gpus-per-job must be a whole number on SLURM, got {gpus_per_job}")
    executor = submitit.AutoExecutor(folder=jobs[0].output_dir.parent / "submitit", cluster=cluster)
    executor.update_parameters(name="domainfusion", timeout_min=timeout_min, cpus_per_task=cpus_per_job,
                               gpus_per_node=int(gpus), slurm_partition=slurm_partition,
                               slurm_array_parallelism=n_parallel)
    env = thread_env(1, cores=cpus_per_job)
    submitted = executor.submit_array([SubmititJob(job, env) for job in jobs])
    by_id = {id(s): job for s, job in zip(submitted, jobs)}
    return summarize(jobs, ((by_id[id(s)], _submitit_outcome(s))
                            for s in submitit.helpers.as_completed(submitted, poll_frequency=2)))


def _submitit_outcome(submitted: Any) -> Outcome:
    """The job's return code, or why its task ended without one (killed, not requeued, node failure)."""
    try:
        return submitted.result()
    except Exception as error:  # submitit re-raises whatever ended the task: UncompletedJobError, FailedJobError...
        return f"submitit task {submitted.job_id} ended without a result: {type(error).__name__}"


LAUNCHERS: dict[str, Callable[..., int]] = {
    "local": local_launcher,
    "dummy": dummy_launcher,
    "ray": ray_launcher,
    "slurm": slurm_launcher,
}


def get_launcher(name: str, options: Mapping[str, Any]) -> Callable[[Sequence[Job], int], int]:
    """The launcher `name` with its `options` bound (None values dropped), checked before anything runs."""
    if name not in LAUNCHERS:
        raise UserError(f"unknown launcher {name!r}; choose one of {', '.join(LAUNCHERS)}")
    launcher = LAUNCHERS[name]
    options = {k: v for k, v in options.items() if v is not None}
    accepted = set(inspect.signature(launcher).parameters) - {"jobs", "n_parallel"}
    foreign = sorted(set(options) - accepted)
    if foreign:
        flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
        raise UserError(f"the {name} launcher takes no {flags}")
    return functools.partial(launcher, **options)
