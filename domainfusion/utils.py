"""Small helpers shared by the data, training and sweep layers (DomainBed-compatible seeding)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch


def cache_dir() -> Path:
    """Where derived artefacts (materialised models) go: $DOMAINFUSION_CACHE, else $XDG_CACHE_HOME/domainfusion, else
    ~/.cache/domainfusion, as the Hugging Face cache does. Never a dataset folder: there an extra sub-folder would
    become a domain of every image-folder dataset read from it."""
    if os.environ.get("DOMAINFUSION_CACHE"):
        return Path(os.environ["DOMAINFUSION_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "domainfusion"


def machine_description() -> str:
    """One line naming the CPU/GPU, core count and library versions numbers were measured (or weights trained) with."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}; Python {platform.python_version()}, torch {torch.__version__}"


def seed_hash(*args: Any) -> int:
    """Derive an integer seed from arbitrary arguments exactly as DomainBed's `misc.seed_hash` does."""
    args_str = str(args)
    return int(hashlib.md5(args_str.encode("utf-8")).hexdigest(), 16) % (2**31)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch global RNGs and make cuDNN deterministic, as DomainBed's train.py does."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` so that a crash mid-write leaves either the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line and fsync it, so a finished checkpoint's record survives a kill."""
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def save_npz_atomic(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Write an .npz through a temp file in the same folder, fsync, then rename: a kill mid-write never leaves a
    broken cache behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; caches are shared data
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def publish_dir(build: Callable[[Path], object], dest: Path, replace: bool = True) -> Path:
    """Build a folder in a temp sibling, then rename it into place, so a kill never leaves half a model.

    Replacing moves the old folder aside (`retired(dest)`) before the new one is renamed in and deletes it only
    after: a kill between the two renames leaves the old folder complete, and `recover_dir` puts it back. With
    `replace=False` a `dest` that another process published meanwhile wins (same content by construction), so
    parallel jobs sharing a data folder never delete a folder another job is reading.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(dest)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=dest.name + ".", suffix=".tmp"))
    old = retired(dest)
    try:
        build(tmp)
        _readable_by_all(tmp)
        if replace and dest.exists():
            if old.exists():
                shutil.rmtree(old)
            dest.rename(old)
        try:
            tmp.rename(dest)
        except OSError:
            if replace or not dest.is_dir():
                raise
            shutil.rmtree(tmp)
        _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        recover_dir(dest)
        raise
    if old.exists():
        shutil.rmtree(old)
    return dest


def retired(dest: Path) -> Path:
    """Where `publish_dir` keeps the folder it is replacing until the new one is in place."""
    return dest.with_name(dest.name + ".old")


def recover_dir(dest: Path) -> None:
    """Undo a replacement a kill interrupted between its two renames: the old folder goes back to `dest`."""
    if not dest.exists() and retired(dest).is_dir():
        retired(dest).rename(dest)


def _fsync_dir(folder: Path) -> None:
    """Make renames inside `folder` durable (a power cut after publish must not bring the old entry back)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _readable_by_all(folder: Path) -> None:
    """mkdtemp and some writers create owner-only files; published folders get the usual 0755/0644 (minus umask)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o755 if path.is_dir() else 0o644) & ~umask)


def save_module(module: torch.nn.Module, path: str | os.PathLike) -> None:
    """A module's tensors as safetensors, each tensor shared between submodules stored once; readable by all like
    the run's other files (safetensors itself creates the file owner-only)."""
    import safetensors.torch

    safetensors.torch.save_model(module, str(path))
    os.chmod(path, 0o644)


def load_module(module: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load `save_module`'s file into a freshly built module; every tensor must be set and none left over.

    Aliases (DomainBed algorithms hold `featurizer` and `classifier` again inside `network`) are resolved by storage
    here rather than by safetensors' `load_model`, which reports the alias of a BatchNorm's `num_batches_tracked`
    as unexpected (BatchNorm fills a missing counter itself), so a ResNet algorithm could not be restored.
    """
    import safetensors.torch

    tensors = safetensors.torch.load_file(str(path))
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    state = module.state_dict(keep_vars=True)
    loaded = {state[k].data_ptr() for k in tensors if k in state}
    missing = [k for k in missing if state[k].data_ptr() not in loaded]
    if missing or unexpected:
        raise RuntimeError(
            f"{path} does not match {type(module).__name__} (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )


def optimizers(algorithm: torch.nn.Module) -> dict[str, torch.optim.Optimizer]:
    """The optimisers an algorithm owns (attributes): what a checkpoint saves and data parallelism synchronises."""
    return {k: v for k, v in vars(algorithm).items() if isinstance(v, torch.optim.Optimizer)}


def generators(algorithm: torch.nn.Module) -> dict[str, torch.Generator]:
    """The random generators an algorithm owns (attributes): saved per rank, seeded per rank under data parallelism."""
    return {k: v for k, v in vars(algorithm).items() if isinstance(v, torch.Generator)}
