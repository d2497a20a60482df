"""Data-parallel training under `torchrun` / `accelerate launch`: the few collectives `train` needs.

Both launchers describe the job in the environment (`WORLD_SIZE`, `RANK`, `LOCAL_RANK`, `MASTER_ADDR/PORT`); with
`WORLD_SIZE` > 1 every process joins one process group (gloo on CPU, NCCL on CUDA, one GPU per local rank). Without
it every helper here is a no-op, so a single process runs exactly the code path it always did.

Algorithms call `optimizer.step()` inside `update` (DomainBed's contract), so instead of wrapping the network in
`DistributedDataParallel` a step pre-hook on each optimiser averages the gradients of its parameters across ranks
(flattened all-reduces of ~4 MiB buckets) just before the step: algorithms stay untouched, and the replicas stay
identical because they start identical (rank 0's parameters are broadcast) and apply identical updates.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .errors import UserError
from .utils import generators, optimizers, seed_everything, seed_hash

Chunk = tuple[torch.Tensor, ...]
# Gradient all-reduce bucket. `average_gradients` on ResNet-18's 42.6 MiB of gradients, 2 gloo CPU processes (ms
# per call, busy 2-core machine): 4 MiB buckets 104-119, 1 MiB 125, one bucket 168-178, one per parameter 220-229;
# on the MNIST CNN (1.4 MiB, one bucket either way) 8 against 34 per parameter. Very large gloo all-reduces are slow
# and small ones pay per-call latency; 4 MiB also keeps NCCL's call count low (benchmarks/ddp_scaling.py).
BUCKET_BYTES = 4 * 2**20


def launched() -> bool:
    """Whether a launcher started this process as one of several (`WORLD_SIZE` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0 is the only process that writes into the output folder."""
    return rank() == 0


def resolve_device(name: str) -> torch.device:
    """'auto' → CUDA when available; under a launcher a bare 'cuda' (or 'auto') means this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name} is not a device this tool trains on; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is visible to torch here; use --device cpu (or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) are visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available here; use --device cpu (or auto)")
    if launched() and device.type == "cuda":
        if device.index is not None:
            raise UserError(
                f"--device {name} names one GPU for every process; under torchrun/accelerate use "
                "--device cuda (each process takes the GPU of its LOCAL_RANK)"
            )
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def setup(device_name: str) -> torch.device:
    """This process's device; under a launcher, also join its process group (once per process, left at exit: a
    group destroyed and created again on the launcher's store hangs, and several runs may share one launch)."""
    device = resolve_device(device_name)
    if launched() and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(leave)
    return device


def leave() -> None:
    """Leave the process group if still in it (a caller may have left it already)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (pickled: only ever objects this run's own rank 0 built)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_object(obj: Any) -> list[Any] | None:
    """Every rank's `obj`, in rank order, on rank 0; None on the other ranks."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def _all_reduce(values: list[float], op: dist.ReduceOp, device: torch.device) -> list[float]:
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def sum_across_ranks(values: list[float], device: torch.device) -> list[float]:
    return _all_reduce(values, dist.ReduceOp.SUM, device)


def max_across_ranks(values: list[float], device: torch.device) -> list[float]:
    return _all_reduce(values, dist.ReduceOp.MAX, device)


def mean_across_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average per-rank means (same keys on every rank): the mean over the global batch, since ranks hold equal
    shares of it."""
    if not dist.is_initialized():
        return values
    keys = sorted(values)
    sums = sum_across_ranks([values[k] for k in keys], device)
    return {k: s / world_size() for k, s in zip(keys, sums)}


def shard_rows(n: int) -> slice:
    """This rank's contiguous block of n rows (blocks in rank order, sizes differ by at most one)."""
    w, r = world_size(), rank()
    return slice(n * r // w, n * (r + 1) // w)


def batch_shard(dataset: torch.utils.data.Dataset, batch_size: int) -> torch.utils.data.Dataset:
    """The batches r, r + W, … of a sequential loader over `dataset`: each evaluation batch is exactly the one a
    single process forms, so predictions (and summed accuracy counts) are identical to single-process ones."""
    w, r = world_size(), rank()
    if w == 1:
        return dataset
    n = len(dataset)
    keys = [i for b in range(r * batch_size, n, w * batch_size) for i in range(b, min(b + batch_size, n))]
    return torch.utils.data.Subset(dataset, keys)


def gather_chunk(rows: slice, make: Callable[[], Chunk]) -> Iterator[Chunk]:
    """A chunk that the ranks make together, each its block `rows` (`shard_rows`; `make()` is not called for an
    empty block): rank 0 yields the whole chunk, the blocks concatenated in rank order, the other ranks nothing.
    Collective: every rank calls it for every chunk, and runs it to the end."""
    gathered = gather_object(make() if rows.start < rows.stop else None)
    blocks = [b for b in gathered or () if b is not None]  # none off rank 0; empty blocks are None
    if blocks:
        yield tuple(torch.cat(columns) for columns in zip(*blocks))


def _buckets(params: list[torch.nn.Parameter]) -> list[list[torch.nn.Parameter]]:
    """Consecutive parameters of one device and dtype, about BUCKET_BYTES each (a larger parameter alone)."""
    buckets: list[list[torch.nn.Parameter]] = []
    size = 0
    for p in params:
        key = (p.device, p.dtype)
        if not buckets or size >= BUCKET_BYTES or (buckets[-1][0].device, buckets[-1][0].dtype) != key:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += p.numel() * p.element_size()
    return buckets


@torch.no_grad()
def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Replace each gradient by its mean over ranks, one flattened all-reduce per bucket of parameters.

    A parameter that some ranks did not use (grad None) counts as a zero gradient there, which is its exact
    contribution to the global-batch mean; its grad stays None only where no rank used it, so optimisers skip it as
    a single process would.
    """
    w = world_size()
    for bucket in _buckets([p for p in params if p.requires_grad]):
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket]
        used = torch.tensor([p.grad is not None for p in bucket], dtype=bucket[0].dtype, device=bucket[0].device)
        flat = _flatten_dense_tensors(grads + [used])
        dist.all_reduce(flat)
        flat /= w
        *averaged, used = _unflatten_dense_tensors(flat, grads + [used])
        for p, g, u in zip(bucket, averaged, used.tolist()):
            if u == 0:
                p.grad = None
            elif p.grad is None:
                p.grad = g
            else:
                p.grad.copy_(g)


def _average_before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    average_gradients([p for group in optimizer.param_groups for p in group["params"]])


def make_data_parallel(algorithm: torch.nn.Module, seed: int, fresh: bool) -> None:
    """Turn this rank's algorithm into a replica: average gradients before every optimiser step and (for a fresh
    run) start from rank 0's weights with this rank's own random streams.

    Per-rank RNG (global and the algorithm's generators: synthetic-pool draws, LD noise) keeps ranks from drawing the
    same synthetic images and noise for their different samples; a resumed run instead restores each rank's streams
    from the checkpoint.
    """
    if world_size() == 1:
        return
    for optimizer in optimizers(algorithm).values():
        optimizer.register_step_pre_hook(_average_before_step)
    if not fresh:
        return
    for tensor in algorithm.state_dict().values():
        dist.broadcast(tensor, src=0)
    seed_everything(seed_hash(seed, "rank", rank()))
    for generator in generators(algorithm).values():
        generator.manual_seed(seed_hash(generator.initial_seed(), "rank", rank()))
