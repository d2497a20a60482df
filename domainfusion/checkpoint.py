"""Exact resume: everything a training run's future depends on, written atomically at every checkpoint.

A checkpoint (`OUTPUT_DIR/checkpoint/`) holds the algorithm's tensors (weights and buffers such as DomainFusion's
step counter, safetensors), its optimisers' state (`torch.save`, read back with `weights_only=True`), every random
generator (python, numpy, torch CPU/CUDA, and each `torch.Generator` the algorithm owns; one file per rank) and hard
links to the current generation of each synthetic pool, so a refresh after the checkpoint cannot destroy the pool it
needs. Data-loader positions need no state: loaders are re-created from their seeds and fast-forwarded by the number
of batches already drawn. The folder is built under a temp name, fsynced and renamed, so a kill mid-write leaves the
previous checkpoint intact.

What it must not do: unpickle anything but tensors, or write outside OUTPUT_DIR.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch

from .data.pool import SyntheticPool
from .errors import UserError
from .utils import generators, load_module, optimizers, publish_dir, recover_dir, save_module

CHECKPOINT = "checkpoint"
RngState = tuple[dict[str, torch.Tensor], dict[str, Any]]  # tensors, JSON-able scalars


def _pool(algorithm: torch.nn.Module) -> SyntheticPool | None:
    """The algorithm's synthetic pool, if it has one."""
    return getattr(algorithm, "pool", None)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def rng_state(algorithm: torch.nn.Module) -> RngState:
    """This process's random state: tensors (torch CPU/CUDA, numpy keys, the algorithm's generators) and the
    JSON-able rest (python, numpy position)."""
    np_state = np.random.get_state()
    tensors = {"torch_cpu": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        tensors.update({f"torch_cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    tensors.update({f"generator.{k}": g.get_state() for k, g in generators(algorithm).items()})
    py_version, py_keys, py_gauss = random.getstate()
    scalars = {
        "python_random": [py_version, list(py_keys), py_gauss],
        "numpy_random": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, scalars


def set_rng_state(algorithm: torch.nn.Module, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
    """Inverse of `rng_state`."""
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda")])
    for name, generator in generators(algorithm).items():
        generator.set_state(tensors[f"generator.{name}"])
    py_version, py_keys, py_gauss = scalars["python_random"]
    random.setstate((py_version, tuple(py_keys), py_gauss))
    kind, pos, has_gauss, cached = scalars["numpy_random"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))


def write_checkpoint(
    out: Path, step: int, algorithm: torch.nn.Module, extra: dict[str, Any], rngs: list[RngState] | None = None
) -> Path:
    """Replace OUTPUT_DIR/checkpoint with the state after training step `step` (0-based, completed).

    Under data parallelism rank 0 writes; `rngs` are every rank's `rng_state`s in rank order (default: this
    process's alone), one `rng-rank{r}.safetensors` each, since each rank draws its own random streams.
    """

    def build(tmp: Path) -> None:
        save_module(algorithm, tmp / "model.safetensors")
        torch.save({k: o.state_dict() for k, o in optimizers(algorithm).items()}, tmp / "optimizers.pt")
        for r, (tensors, scalars) in enumerate(rngs or [rng_state(algorithm)]):
            safetensors.torch.save_file(
                tensors, str(tmp / f"rng-rank{r}.safetensors"), metadata={"scalars": json.dumps(scalars)}
            )
        state = {"step": step, **extra}
        pool = _pool(algorithm)
        if pool is not None:
            state["pool"] = str(pool.root.relative_to(out))
            pool.link_into(tmp / "pool")
        (tmp / "state.json").write_text(json.dumps(state))
        _fsync_tree(tmp)

    return publish_dir(build, out / CHECKPOINT)


def read_state(out: Path) -> dict[str, Any] | None:
    """The checkpoint's state.json (step and extras), or None when the run has no complete checkpoint. A kill in the
    middle of replacing the checkpoint leaves the previous one, which is restored first."""
    recover_dir(out / CHECKPOINT)
    path = out / CHECKPOINT / "state.json"
    if not path.is_file():
        return None
    with _damage_is_a_user_error(path):
        state = json.loads(path.read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("no integer 'step'")
        if "pool" in state:
            _pool_in(out, state["pool"])
    return state


def _pool_in(out: Path, pool: str) -> Path:
    """The pool folder state.json names, which must lie inside OUTPUT_DIR (restoring it deletes what is there)."""
    root = (out / pool).resolve()
    if Path(pool).is_absolute() or out.resolve() not in root.parents:
        raise ValueError(f"pool {pool!r} is not a folder inside {out}")
    return root


@contextlib.contextmanager
def _damage_is_a_user_error(path: Path) -> Iterator[None]:
    """A checkpoint file that a kill, a full disk or a hand cut short: one error naming it, not a traceback."""
    try:
        yield
    except (
        OSError,
        ValueError,
        RuntimeError,
        EOFError,
        KeyError,
        pickle.UnpicklingError,
        safetensors.SafetensorError,
    ) as e:
        raise UserError(
            f"checkpoint file {path} is damaged ({type(e).__name__}: {e}); this run cannot resume from "
            "it: rerun without --resume to start over"
        ) from None


def restore_pool(out: Path, state: dict[str, Any]) -> None:
    """Put the checkpointed pool back in place (hard links again) before the algorithm opens it: the live pool may
    have been refreshed after the checkpoint."""
    if "pool" in state:
        SyntheticPool.restore(out / CHECKPOINT / "pool", _pool_in(out, state["pool"]))


def restore_checkpoint(out: Path, algorithm: torch.nn.Module, rank: int = 0) -> dict[str, Any]:
    """Load weights, optimisers and every RNG (rank `rank`'s) into a freshly built algorithm; returns state.json."""
    folder = out / CHECKPOINT
    state = read_state(out)
    with _damage_is_a_user_error(folder / "model.safetensors"):
        load_module(algorithm, folder / "model.safetensors")
    with _damage_is_a_user_error(folder / "optimizers.pt"):
        optimizer_states = torch.load(folder / "optimizers.pt", weights_only=True)
        for name, optimizer in optimizers(algorithm).items():
            optimizer.load_state_dict(optimizer_states[name])
    path = folder / f"rng-rank{rank}.safetensors"
    if path.is_file():
        with _damage_is_a_user_error(path), safetensors.safe_open(str(path), framework="pt") as f:
            set_rng_state(algorithm, {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["scalars"]))
    else:  # a checkpoint from before per-rank files: rank 0's tensors in rng.safetensors, its scalars in state.json
        with _damage_is_a_user_error(folder / "rng.safetensors"):
            set_rng_state(algorithm, safetensors.torch.load_file(str(folder / "rng.safetensors")), state)
    return state
