"""Sweep launchers: where the jobs of a sweep run. Each is `(jobs, n_parallel, nproc_per_job, **options) -> number
failed`.

Every launcher runs the same thing, `run_job`: the job's `domainfusion train --resume` subprocess with its logs in the
job folder; a job of N > 1 processes runs that command under torch's elastic launcher (`job_command`), or, on SLURM,
as N tasks that each run it as one rank. So a job behaves the same under any launcher, and anything that stops a job
early (Ctrl-C, a lost Ray node, a SLURM pre-emption) leaves it Incomplete, to be resumed from its last checkpoint by
the next launch (or by the engine's own retry/requeue). Scheduling is left to the engines: a thread pool here, Ray's
resource scheduler, SLURM. Ray and submitit are imported inside their launchers, so the core package does not depend
on them.
"""

from __future__ import annotations

import fcntl
import importlib
import inspect
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from tqdm import tqdm

from .errors import UserError
from .sweep import DONE, Job

CLUSTER_EXTRA = "pip install 'domainfusion[cluster]'"
# A line of torch elastic's logger (glog format), e.g. "E1128 01:57:17.540000 3811 torch/distributed/elastic/...".
_TORCHRUN_LOG = re.compile(r"[IWEF]\d{4} [\d:.]+ +\d+ \S*torch/distributed/elastic/")
Outcome = int | str  # a return code, or what happened to a task that never returned one


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def thread_env(n_parallel: int, cores: int | None = None) -> dict[str, str]:
    """Thread variables for each job: cores split evenly so parallel jobs do not oversubscribe the CPU.

    A thread count the user exported explicitly wins.
    """
    threads = str(max(1, (cores or _cpu_count()) // n_parallel))
    return {var: os.environ.get(var, threads) for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def job_command(job: Job, nproc: int) -> list[str]:
    """The job's `train` command, as `nproc` data-parallel processes under torch's elastic launcher when nproc > 1.

    `--standalone` rendezvouses on a port that torchrun picks free itself, so jobs started at once on one machine
    never collide. Rank 0 writes to the job's out.txt/err.txt, as a single process does (so failure reports quote
    it); the other ranks' streams go to files under JOB/torchrun/.
    """
    if nproc == 1:
        return job.command
    python, *module = job.command  # python -m domainfusion train ...
    others = ",".join(f"{r}:3" for r in range(1, nproc))
    return [
        python,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        f"--log-dir={job.output_dir / 'torchrun'}",
        f"--redirects={others}",
        *module,
    ]


def run_job(job: Job, command: Sequence[str], env: Mapping[str, str], rank: int = 0) -> int:
    """Run `command` for the job (stdout/stderr to out.txt/err.txt in its folder) with `env` over this process's
    variables.

    The job folder's `launch.lock` is held for the whole run and inherited by the training process (or torchrun), so
    a second runner of the same job (a concurrent launch of the same sweep, or an engine's retry while the process of
    a crashed worker still runs) waits instead of training in the same folder; it then finds the job done or resumes
    it. `rank` r > 0 is one rank of a job whose ranks the scheduler starts one by one (SLURM tasks): it waits on a
    lock of its own (`launch-rank{r}.lock`) and logs to `out-rank{r}.txt`/`err-rank{r}.txt`, so that it, too, starts
    only once the previous runner's rank r has ended, and sees the job done exactly when rank 0 does.
    """
    suffix = f"-rank{rank}" if rank else ""
    job.output_dir.mkdir(parents=True, exist_ok=True)
    with open(job.output_dir / f"launch{suffix}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if job.state == DONE:
            return 0
        with (
            open(job.output_dir / f"out{suffix}.txt", "w") as out,
            open(job.output_dir / f"err{suffix}.txt", "w") as err,
        ):
            process = subprocess.Popen(
                command,
                stdout=out,
                stderr=err,
                env={**os.environ, **env},
                stdin=subprocess.DEVNULL,
                pass_fds=(lock.fileno(),),
            )
            try:
                return process.wait()
            except BaseException:  # Ctrl-C, Ray's cancel, submitit's requeue: the run stops with this runner
                # SIGTERM, not subprocess.run's SIGKILL: torchrun passes it on to its workers, which run in sessions
                # of their own and would otherwise go on training without the lock.
                process.terminate()
                process.wait()
                raise


def _tail(path: Path, n: int = 3) -> list[str]:
    """The end of a job's stderr: a traceback's exception line or the wrapped `error:` message of a UserError. Under
    torchrun, the end of rank 0's output: what precedes torchrun's own log lines about the failure (and its report)."""
    if not path.exists():
        return ["(missing: the job never started)"]
    lines = [line.rstrip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    torchrun = next((i for i, line in enumerate(lines) if _TORCHRUN_LOG.match(line)), len(lines))
    return lines[:torchrun][-n:] or lines[-n:] or ["(empty)"]


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
        print(f"  failed ({why}): {job.name}\n    {err}:")
        print("\n".join("      " + line for line in _tail(err)))
    return len(failed)


def _require(module: str, launcher: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"the {launcher} launcher needs {module}: {CLUSTER_EXTRA}") from None


def _on_gpus(jobs: Sequence[Job], gpus_there: bool) -> bool:
    """Whether the jobs train on GPUs: `--device cuda`, or `auto` where the jobs run has GPUs (`gpus_there`)."""
    return any(job.device.startswith("cuda") or (job.device == "auto" and gpus_there) for job in jobs)


def job_resources(nproc: int, cpus_per_job: int | None, gpus_per_job: float | None, on_gpus: bool) -> tuple[int, float]:
    """The CPUs and GPUs one job of `nproc` processes reserves: by default one CPU per process and, `on_gpus`, one
    GPU per process. Processes share CPUs evenly, and each process of a multi-process job trains on a whole GPU of
    its own (the one of its local rank), so other amounts are refused."""
    cpus = nproc if cpus_per_job is None else cpus_per_job
    gpus = (nproc if on_gpus else 0) if gpus_per_job is None else gpus_per_job
    if cpus < 1 or cpus % nproc:
        raise UserError(
            f"--cpus-per-job {cpus} cannot be shared by the {nproc} processes of a job; give a multiple "
            f"of --nproc-per-job {nproc}"
        )
    if nproc > 1 and gpus not in (0, nproc):
        raise UserError(
            f"--gpus-per-job {gpus_per_job} does not fit --nproc-per-job {nproc}: each process trains on "
            f"a GPU of its own; give {nproc} (or 0 to train on CPUs), or leave it out"
        )
    return cpus, gpus


def local_launcher(jobs: Sequence[Job], n_parallel: int, nproc_per_job: int = 1) -> int:
    """Run jobs as subprocesses on this machine, `n_parallel` at a time, CPU threads split evenly between all their
    processes. A job of `nproc_per_job` > 1 processes runs under torchrun, on GPUs 0..nproc_per_job - 1 when it
    trains on GPUs (which jobs running at once share, as single-process jobs share GPU 0)."""
    visible = torch.cuda.device_count()
    if _on_gpus(jobs, visible > 0) and visible < nproc_per_job:
        raise UserError(
            f"--nproc-per-job {nproc_per_job} trains each job on {nproc_per_job} GPUs, but this machine "
            f"has {visible} visible; lower --nproc-per-job or pass --device cpu"
        )
    env = thread_env(n_parallel * nproc_per_job)
    pool = ThreadPoolExecutor(max_workers=n_parallel)
    try:
        futures = {pool.submit(run_job, job, job_command(job, nproc_per_job), env): job for job in jobs}
        return summarize(jobs, ((futures[f], f.result()) for f in as_completed(futures)))
    finally:
        # On Ctrl-C start nothing new; running jobs (same process group, same SIGINT) stop and stay INCOMPLETE.
        pool.shutdown(wait=True, cancel_futures=True)


def dummy_launcher(jobs: Sequence[Job], n_parallel: int, nproc_per_job: int = 1) -> int:
    """Print the commands instead of running them (to inspect a sweep, or to hand them to another scheduler)."""
    for job in jobs:
        print(shlex.join(job_command(job, nproc_per_job)))
    return 0


def ray_launcher(
    jobs: Sequence[Job],
    n_parallel: int,
    nproc_per_job: int = 1,
    *,
    cpus_per_job: int | None = None,
    gpus_per_job: float | None = None,
    ray_address: str | None = None,
    max_retries: int = 3,
) -> int:
    """One Ray task per job, reserving `cpus_per_job` CPUs and `gpus_per_job` GPUs (fractions allowed for one process)
    and running the job's command (under torchrun for `nproc_per_job` > 1, on the GPUs Ray assigns the task).

    Connects to the cluster at `ray_address` ('auto', 'ray://head:10001', ...) or, without one, to the cluster named
    by RAY_ADDRESS or a new local instance; a Ray session that is already initialised in this process is used as is.
    By default a job reserves one CPU per process and, if it trains on GPUs (`--device cuda`, or `auto` on a cluster
    with GPUs), one GPU per process (`job_resources`). At most `n_parallel` tasks are in flight; Ray runs as many of
    them as the free resources allow. A task whose worker or node dies is retried up to `max_retries` times (safe: the
    command resumes, and the job lock in `run_job` keeps a retry from racing a still-running process); a job that
    fails by itself (non-zero exit) is not retried.
    """
    ray = _require("ray", "ray")
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=ray_address)
        except ConnectionError as error:
            raise UserError(f"cannot reach the Ray cluster (--ray-address {ray_address}): {error}") from None
    try:
        on_gpus = _on_gpus(jobs, ray.cluster_resources().get("GPU", 0) > 0)
        cpus, gpus = job_resources(nproc_per_job, cpus_per_job, gpus_per_job, on_gpus)
        task = ray.remote(run_job).options(num_cpus=cpus, num_gpus=gpus, max_retries=max_retries)
        env = thread_env(nproc_per_job, cores=cpus)
        return summarize(jobs, _ray_outcomes(ray, task, jobs, n_parallel, nproc_per_job, env))
    finally:
        if started:
            ray.shutdown()


def _ray_outcomes(
    ray: ModuleType, task: Any, jobs: Sequence[Job], n_parallel: int, nproc: int, env: Mapping[str, str]
) -> Iterable[tuple[Job, Outcome]]:
    """Ray's pattern for bounding pending tasks: submit up to `n_parallel`, `ray.wait` for one, submit the next."""
    queue = list(reversed(jobs))
    running: dict[Any, Job] = {}
    try:
        while queue or running:
            while queue and len(running) < n_parallel:
                job = queue.pop()
                running[task.remote(job, job_command(job, nproc), env)] = job
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
    """One sweep job as a submitit callable that SLURM can pre-empt and requeue; with `nproc` > 1, what each of the
    job's `nproc` tasks runs: one rank of the data-parallel `train`.

    On pre-emption or timeout submitit calls `checkpoint()` (on rank 0 only) and requeues what it returns: the same
    job, whose `--resume` command continues from the last checkpoint. submitit recognises checkpointable callables by
    this method, so the class need not subclass `submitit.helpers.Checkpointable` (which would import submitit here).
    """

    def __init__(self, job: Job, env: Mapping[str, str], nproc: int = 1) -> None:
        self.job = job
        self.env = dict(env)
        self.nproc = nproc

    def __call__(self) -> int:
        if self.nproc == 1:
            return run_job(self.job, self.job.command, self.env)
        from submitit.helpers import TorchDistributedEnvironment

        # WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT from SLURM's task variables (or the local executor's),
        # replacing any the submitting shell exported. Every GPU of the node stays visible, so each rank takes the
        # one of its LOCAL_RANK, as under torchrun.
        ranks = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        return run_job(self.job, self.job.command, self.env, rank=ranks.rank)

    def checkpoint(self) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(SubmititJob(self.job, self.env, self.nproc))


def slurm_launcher(
    jobs: Sequence[Job],
    n_parallel: int,
    nproc_per_job: int = 1,
    *,
    cpus_per_job: int | None = None,
    gpus_per_job: float | None = None,
    slurm_partition: str | None = None,
    timeout_min: int = 24 * 60,
    cluster: str = "slurm",
) -> int:
    """Submit the jobs as one SLURM job array through submitit, `n_parallel` running at once, and wait for them.

    Each array job gets `cpus_per_job` CPUs and `gpus_per_job` GPUs on one node for `timeout_min` minutes (by default
    one CPU per process, and one GPU per process with `--device cuda`), and runs as `nproc_per_job` SLURM tasks, one
    rank each; a job that is pre-empted or times out is requeued by submitit and resumes (up to 3 timeouts).
    submitit's files go to `<sweep folder>/submitit`. `cluster="local"` runs the same tasks with submitit's local
    executor (for tests; it starts them all at once). The SLURM jobs outlive this process: if it is stopped,
    `sweep list` still shows them.
    """
    submitit = _require("submitit", "slurm")
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise UserError(
            "the slurm launcher submits with sbatch, which is not on PATH here; launch the sweep from a "
            "SLURM login node"
        )
    cpus, gpus = job_resources(nproc_per_job, cpus_per_job, gpus_per_job, _on_gpus(jobs, False))
    if gpus != int(gpus):
        raise UserError(f"--gpus-per-job must be a whole number on SLURM, got {gpus_per_job}")
    executor = submitit.AutoExecutor(folder=jobs[0].output_dir.parent / "submitit", cluster=cluster)
    executor.update_parameters(
        name="domainfusion",
        timeout_min=timeout_min,
        nodes=1,
        tasks_per_node=nproc_per_job,
        cpus_per_task=cpus // nproc_per_job,
        gpus_per_node=int(gpus),
        slurm_partition=slurm_partition,
        slurm_array_parallelism=n_parallel,
    )
    env = thread_env(nproc_per_job, cores=cpus)
    submitted = executor.submit_array([SubmititJob(job, env, nproc_per_job) for job in jobs])
    by_id = {id(s): job for s, job in zip(submitted, jobs)}
    return summarize(
        jobs, ((by_id[id(s)], _submitit_outcome(s)) for s in submitit.helpers.as_completed(submitted, poll_frequency=2))
    )


def _submitit_outcome(submitted: Any) -> Outcome:
    """The job's return code (its first task's that is not 0), or why a task ended without one (killed, not
    requeued, node failure)."""
    try:
        return next((code for code in submitted.results() if code != 0), 0)
    except Exception as error:  # submitit re-raises whatever ended the task: UncompletedJobError, FailedJobError...
        return f"submitit task {submitted.job_id} ended without a result: {type(error).__name__}"


LAUNCHERS: dict[str, Callable[..., int]] = {
    "local": local_launcher,
    "dummy": dummy_launcher,
    "ray": ray_launcher,
    "slurm": slurm_launcher,
}


@dataclass(frozen=True)
class BoundLauncher:
    """A launcher with its options bound: the `sweep.Launcher` that `sweep.sweep` runs its jobs with."""

    name: str
    run: Callable[..., int]
    options: Mapping[str, Any]

    def __call__(self, jobs: Sequence[Job], n_parallel: int, nproc_per_job: int) -> int:
        return self.run(jobs, n_parallel, nproc_per_job, **self.options)


def get_launcher(name: str, options: Mapping[str, Any]) -> BoundLauncher:
    """The launcher `name` with its `options` bound (None values dropped), checked before anything runs."""
    if name not in LAUNCHERS:
        raise UserError(f"unknown launcher {name!r}; choose one of {', '.join(LAUNCHERS)}")
    launcher = LAUNCHERS[name]
    options = {k: v for k, v in options.items() if v is not None}
    accepted = set(inspect.signature(launcher).parameters) - {"jobs", "n_parallel", "nproc_per_job"}
    foreign = sorted(set(options) - accepted)
    if foreign:
        flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
        raise UserError(f"the {name} launcher takes no {flags}")
    return BoundLauncher(name, launcher, options)
