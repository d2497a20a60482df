"""One training run with DomainBed's semantics: seeded in/out splits, infinite per-domain loaders, a results.jsonl
line per checkpoint with DomainBed's keys, the final model as safetensors and a `done` marker.

Everything downstream (model selection, tables, plots, the sweep launcher) reads only the output folder.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import distributed
from . import hparams as hparams_registry
from .algorithms import RunContext, algorithm_class
from .checkpoint import read_state, restore_checkpoint, restore_pool, rng_state, write_checkpoint
from .config_fields import ResultFree, changed_fields, result_free
from .data import get_dataset
from .data.base import MultipleDomainDataset
from .data.loaders import InfiniteDataLoader, class_balanced_weights, eval_loader, holdout_split
from .errors import UserError
from .output_dir import RUN_FILES, OutputDir
from .utils import append_jsonl, atomic_write_text, save_module, seed_everything, seed_hash

EVAL_BATCH_SIZE = 256


@dataclass
class TrainArgs:
    """The arguments of one run; stored verbatim as `args` in every results.jsonl record. Those marked
    `result_free` may differ between a run and its resumption."""

    dataset: str = "DigitsDG"
    algorithm: str = "ERM"
    # A name for this configuration (e.g. DomainFusion with some hparams overridden), shown in result tables instead
    # of the algorithm's, so configurations of one algorithm get their own rows; the registry still keys on the
    # algorithm, and the run's seed does not change (variants of one algorithm are paired).
    variant: str | None = None
    test_envs: list[int] = field(default_factory=lambda: [0])
    data_dir: str = "data"
    output_dir: str = result_free(ResultFree.PLACEMENT, default="runs/train")
    hparams: str | None = None
    hparams_seed: int = 0
    trial_seed: int = 0
    seed: int = 0
    steps: int | None = None
    checkpoint_freq: int | None = None
    holdout_fraction: float = 0.2
    allow_missing_classes: bool = False
    image_size: int | None = None
    skip_bad_images: bool = False
    eval_train_in: bool = True
    pretrained: str | None = None
    ldm: str = "embedded"
    prompt_template: str | None = None
    num_workers: int | None = result_free(ResultFree.PLACEMENT, default=None)
    ldm_max_batch: int | None = result_free(ResultFree.PLACEMENT, default=None)  # splits LDM calls: float rounding only
    device: str = result_free(ResultFree.PLACEMENT, default="auto")
    skip_model_save: bool = False
    overwrite: bool = result_free(ResultFree.INVOCATION, default=False)
    resume: bool = result_free(ResultFree.INVOCATION, default=False)
    tensorboard: bool = result_free(ResultFree.LOGGING, default=False)
    progress: bool = result_free(ResultFree.INVOCATION, default=True)


def accuracy(network: torch.nn.Module, loader, device: torch.device) -> float:
    """Top-1 accuracy of `network.predict` over a loader, in eval mode (DomainBed's `misc.accuracy`).

    Under data parallelism each rank's loader holds its share of the batches (`distributed.batch_shard`) and the
    counts are summed over ranks.
    """
    correct = total = 0
    network.eval()
    with torch.inference_mode():
        for x, y in loader:
            logits = network.predict(x.to(device))
            correct += (logits.argmax(1).cpu() == y).sum().item()
            total += len(y)
    network.train()
    correct, total = distributed.sum_across_ranks([correct, total], device)
    return correct / total


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory on GPU (as DomainBed), peak resident memory of this process on CPU; the largest over
    ranks under data parallelism."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 1024**3
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return distributed.max_across_ranks([peak], device)[0]


def prepare_output_dir(args: TrainArgs, output: OutputDir) -> dict[str, Any] | None:
    """Refuse to clobber a finished run; with --resume, the state of the checkpoint to resume from (None: start at
    step 0). Run by rank 0 holding the folder's lock; deletes nothing (see `OutputDir.set_aside`)."""
    out = output.path
    if (out / "done").exists() and not args.overwrite:
        raise UserError(f"{out} holds a finished run (done marker); pass --overwrite or choose another --output-dir")
    if not args.resume or (out / "done").exists():
        return None
    state = read_state(out)
    if state is None:
        if any((out / name).exists() for name in RUN_FILES):  # a run was here, but left nothing to resume from
            print(f"--resume: {out} has no checkpoint; starting from step 0", file=sys.stderr)
        return None
    _check_same_run(out, args)
    return state


def _check_same_run(out: Path, args: TrainArgs) -> None:
    """Refuse to resume a run with arguments that would change its results."""
    changed = changed_fields(json.loads((out / "args.json").read_text())["args"], args, TrainArgs())
    if changed:
        raise UserError(
            f"cannot resume {out}: {', '.join(changed)} differ from the interrupted run; use the same "
            "arguments, or drop --resume to start over"
        )


def _open_output_dir(args: TrainArgs) -> tuple[OutputDir, dict[str, Any] | None]:
    """The output folder, locked by rank 0, and `prepare_output_dir`'s outcome (a refusal included) on every rank."""
    output = OutputDir(args.output_dir)
    if not distributed.is_main():
        outcome = distributed.broadcast_object(None)
        if isinstance(outcome, str):
            raise UserError(outcome)
        return output, outcome
    try:
        output.acquire()
        state = prepare_output_dir(args, output)
    except UserError as e:
        output.release()
        distributed.broadcast_object(str(e))
        raise
    return output, distributed.broadcast_object(state)


def check_args(args: TrainArgs) -> None:
    """Numeric flags that would otherwise fail deep inside training."""
    if not args.test_envs:
        raise UserError("--test-envs is empty; name the held-out environment(s), e.g. --test-envs 0")
    if len(set(args.test_envs)) != len(args.test_envs):
        raise UserError(f"--test-envs names an environment twice: {args.test_envs}")
    if args.image_size is not None and args.image_size < 8:
        raise UserError(f"--image-size must be at least 8 pixels, got {args.image_size}")
    if args.num_workers is not None and args.num_workers < 0:
        raise UserError(f"--num-workers must be 0 (load in the main process) or more, got {args.num_workers}")
    if not 0.0 < args.holdout_fraction < 1.0:
        raise UserError(f"--holdout-fraction must be strictly between 0 and 1, got {args.holdout_fraction}")
    for name in ("steps", "checkpoint_freq", "ldm_max_batch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def train(args: TrainArgs) -> list[dict[str, Any]]:
    """Run training and return the checkpoint records that were written to results.jsonl.

    Under `torchrun` / `accelerate launch` every process runs this with the same arguments: data parallel with the
    same global batch as one process (see docs/protocol.md, "Multi-GPU"); all return the same records and only rank 0
    writes into the output folder.
    """
    check_args(args)
    device = distributed.setup(args.device)
    hp = hparams_registry.resolve_hparams(
        args.algorithm, args.dataset, args.hparams_seed, args.trial_seed, args.hparams
    )
    main = distributed.is_main()
    algorithm_cls = algorithm_class(args.algorithm)
    if distributed.world_size() > 1 and not getattr(algorithm_cls, "DATA_PARALLEL", True):
        raise UserError(f"{args.algorithm} does not support data-parallel training; run it as one process")
    output, resume_state = _open_output_dir(args)
    try:
        return _train_in(output, resume_state, args, hp, algorithm_cls, device)
    except BaseException:
        if main:
            output.restore_replaced()
        raise
    finally:
        output.release()


def _train_in(
    output: OutputDir,
    resume_state: dict[str, Any] | None,
    args: TrainArgs,
    hp: dict,
    algorithm_cls: type,
    device: torch.device,
) -> list[dict[str, Any]]:
    """`train` in its locked output folder."""
    out = output.path
    local_hp = hparams_registry.local_hparams(hp)  # this rank's share of the per-step batches
    world_size, rank, main = distributed.world_size(), distributed.rank(), distributed.is_main()
    if resume_state is not None and resume_state.get("world_size", 1) != world_size:
        raise UserError(
            f"cannot resume {out} with {world_size} process(es): its checkpoint was written by "
            f"{resume_state.get('world_size', 1)}; launch the same number of processes"
        )
    seed_everything(args.seed)
    dataset = _open_dataset(args, hp, output, fresh=resume_state is None)
    start_step = 0 if resume_state is None else resume_state["step"] + 1
    loaders = build_loaders(args, hp, dataset, start_step)

    context = RunContext.for_data(
        loaders.train_splits,
        dataset.class_names,
        [dataset.environments[i] for i in loaders.train_envs],
        output_dir=out,
        batch_size=hp["batch_size"],
        dataset=args.dataset,
        env_names=dataset.environments,
        ldm_model=args.ldm,
        seed=args.seed,
        device=device,
        prompt_template=args.prompt_template,
        data_dir=args.data_dir,
        resume=resume_state is not None,
        input_shape=tuple(dataset.input_shape),
        ldm_max_batch=args.ldm_max_batch,
        num_workers=loaders.num_workers,
    )
    if resume_state is not None and main:
        restore_pool(out, resume_state)
    distributed.barrier()
    algorithm = algorithm_cls(
        dataset.input_shape,
        dataset.num_classes,
        len(loaders.train_envs),
        local_hp,
        pretrained=args.pretrained,
        context=context,
    ).to(device)
    records: list[dict[str, Any]] = []
    if resume_state is not None:
        restore_checkpoint(out, algorithm, rank)
        records = _records_up_to(out / "results.jsonl", resume_state["step"], rewrite=main)
    distributed.make_data_parallel(algorithm, args.seed, fresh=resume_state is None)

    n_steps = args.steps or dataset.N_STEPS
    checkpoint_freq = args.checkpoint_freq or dataset.CHECKPOINT_FREQ
    writer = _tensorboard_writer(out, start_step) if args.tensorboard and main else None
    if main:
        atomic_write_text(out / "args.json", json.dumps({"args": dataclasses.asdict(args), "hparams": hp}, indent=2))

    checkpoint_vals: dict[str, list[float]] = collections.defaultdict(list)
    batches = zip(*loaders.train)
    bar = tqdm(
        range(start_step, n_steps),
        initial=start_step,
        total=n_steps,
        desc=f"{args.algorithm} {args.dataset} test={args.test_envs}",
        disable=not (args.progress and main),
        file=sys.stderr,
    )
    for step in bar:
        step_start = time.time()
        minibatches = [(x.to(device), y.to(device)) for x, y in next(batches)]
        step_vals = algorithm.update(minibatches)
        checkpoint_vals["step_time"].append(time.time() - step_start)
        # Decided on the global-batch means, which a non-finite value on any rank makes non-finite on every rank: all
        # ranks stop here together, before the step's checkpoint (a rank stopping alone would leave the others
        # waiting forever in the next all-reduce).
        for key, val in distributed.mean_across_ranks(step_vals, device).items():
            if not np.isfinite(val):
                raise UserError(
                    f"{key} became {val} at step {step}; lower the learning rate (--hparams '{{\"lr\": ...}}'). "
                    f"Results up to the last checkpoint are in {out / 'results.jsonl'}"
                )
        for key, val in step_vals.items():
            checkpoint_vals[key].append(val)

        if step % checkpoint_freq == 0 or step == n_steps - 1:
            record = checkpoint_record(step, checkpoint_vals, algorithm, loaders, dataset, args, hp, device)
            records.append(record)
            rngs = distributed.gather_object(rng_state(algorithm))  # every rank's, on rank 0
            if main:
                _write_checkpoint(
                    out, record, step, algorithm, {"world_size": world_size} if world_size > 1 else {}, rngs
                )
                output.discard_replaced()
            if writer is not None:
                for key, val in record.items():
                    if isinstance(val, (int, float)) and key != "step":
                        writer.add_scalar(key, val, step)
            test_accs = [record[f"env{i}_in_acc"] for i in args.test_envs]
            bar.set_postfix(loss=f"{record.get('loss', float('nan')):.3f}", test_acc=f"{np.mean(test_accs):.3f}")
            checkpoint_vals = collections.defaultdict(list)

    if writer is not None:
        writer.close()
    if main:
        if not args.skip_model_save:
            write_final_model(algorithm, out, args, hp, dataset)
        atomic_write_text(out / "done", "done")
    distributed.barrier()  # every rank returns once the run is complete on disk
    return records


def _open_dataset(args: TrainArgs, hp: dict, output: OutputDir, fresh: bool) -> MultipleDomainDataset:
    """The run's dataset, built and cached by rank 0 before the other ranks read the cache. Once it has loaded (the
    inputs are valid) a `fresh` run makes room in the folder, keeping the previous run's files aside, and the
    unreadable images it skipped are listed there."""
    out, main = output.path, distributed.is_main()
    if not main:
        distributed.barrier()
    dataset = get_dataset(
        args.dataset,
        args.data_dir,
        args.test_envs,
        hp,
        args.allow_missing_classes,
        args.image_size,
        args.skip_bad_images,
    )
    if main:
        if fresh:
            output.set_aside()
        distributed.barrier()
    if dataset.skipped_images and main:
        atomic_write_text(out / "skipped_images.txt", "".join(p + "\n" for p in dataset.skipped_images))
        print(
            f"skipped {len(dataset.skipped_images)} unreadable image(s), listed in {out / 'skipped_images.txt'}",
            file=sys.stderr,
        )
    return dataset


@dataclass
class RunLoaders:
    """A run's splits and loaders (`build_loaders`).

    Two "steps per epoch" are in play and differ on purpose: `RunContext.steps_per_epoch` (steps per pass over the
    average source in-split) is the unit of DomainFusion's augmentation period, while `domainbed_steps_per_epoch`
    (steps per pass over the smallest in-split, held-out ones included) is DomainBed's `epoch` in results.jsonl,
    kept as DomainBed computes it so records compare with DomainBed's.
    """

    train_envs: list[int]
    in_splits: list[Dataset]  # every environment's, held-out ones included
    train: list[InfiniteDataLoader]  # one per training environment, in `train_envs` order
    eval: list[tuple[str, DataLoader]]  # ("env{i}_in" or "env{i}_out", its loader)
    domainbed_steps_per_epoch: float
    num_workers: int  # loader processes per loader (--num-workers, else the dataset's)

    @property
    def train_splits(self) -> list[Dataset]:
        return [self.in_splits[i] for i in self.train_envs]


def build_loaders(args: TrainArgs, hp: dict, dataset: MultipleDomainDataset, start_step: int) -> RunLoaders:
    """DomainBed's seeded in/out split of every environment, an infinite loader per training environment that
    continues at `start_step` (a resumed run draws the batches the interrupted one would have), and the evaluation
    loaders, each rank holding its share of their batches."""
    in_splits, out_splits = [], []
    for env_i, env in enumerate(dataset):
        out_split, in_split = holdout_split(
            env, env_i, args.holdout_fraction, args.trial_seed, dataset.environments[env_i]
        )
        in_splits.append(in_split)
        out_splits.append(out_split)

    if args.num_workers is not None:
        num_workers = args.num_workers
    else:
        num_workers = 0 if hasattr(dataset[0], "tensors") else dataset.N_WORKERS
    train_envs = [i for i in range(len(dataset)) if i not in args.test_envs]
    # Every rank draws the single-process batch from the same seeded stream and keeps its block of rows: the global
    # batch is exactly the one a single process would train on.
    train_loaders = [
        InfiniteDataLoader(
            in_splits[i],
            class_balanced_weights(in_splits[i]) if hp["class_balanced"] else None,
            hp["batch_size"],
            num_workers,
            generator=torch.Generator().manual_seed(seed_hash(args.seed, "train_loader", i)),
            skip_batches=start_step,
            rows=distributed.shard_rows(hp["batch_size"]),
        )
        for i in train_envs
    ]
    # Model selection never reads the training envs' in-split accuracies; skipping them (--no-eval-train-in)
    # cuts evaluation cost by half or more on CPU, and every selection method gives the same answer.
    eval_splits = [(f"env{i}_in", s) for i, s in enumerate(in_splits) if args.eval_train_in or i in args.test_envs]
    eval_splits += [(f"env{i}_out", s) for i, s in enumerate(out_splits)]
    eval_loaders = [
        (name, eval_loader(distributed.batch_shard(s, EVAL_BATCH_SIZE), EVAL_BATCH_SIZE, num_workers))
        for name, s in eval_splits
    ]
    return RunLoaders(
        train_envs,
        in_splits,
        train_loaders,
        eval_loaders,
        domainbed_steps_per_epoch=min(len(s) for s in in_splits) / hp["batch_size"],
        num_workers=num_workers,
    )


def checkpoint_record(
    step: int,
    checkpoint_vals: dict[str, list[float]],
    algorithm: torch.nn.Module,
    loaders: RunLoaders,
    dataset: MultipleDomainDataset,
    args: TrainArgs,
    hp: dict,
    device: torch.device,
) -> dict[str, Any]:
    """The results.jsonl line of the checkpoint at `step`, with DomainBed's keys: epoch, the training stats averaged
    since the previous checkpoint, every evaluated split's accuracy, the algorithm's own stats, peak memory, and the
    run's args and hparams. Every rank calls it (the means and accuracies are reduced over ranks) and gets rank 0's
    record."""
    record: dict[str, Any] = {"step": step, "epoch": step / loaders.domainbed_steps_per_epoch}
    # per-rank means → global-batch means (ranks hold equal shares of every batch)
    record.update(
        distributed.mean_across_ranks({key: float(np.mean(vals)) for key, vals in checkpoint_vals.items()}, device)
    )
    for name, loader in loaders.eval:
        record[name + "_acc"] = accuracy(algorithm, loader, device)
    record.update(algorithm.checkpoint_stats())
    record["mem_gb"] = peak_memory_gb(device)
    if args.skip_bad_images:
        record["skipped_images"] = len(dataset.skipped_images)
    record["environments"] = dataset.environments
    world_size = distributed.world_size()
    if world_size > 1:
        record["world_size"] = world_size
    record.update({"hparams": hp, "args": dataclasses.asdict(args)})
    return distributed.broadcast_object(record)  # rank 0's run-level stats (generation time) everywhere


def _write_checkpoint(
    out: Path, record: dict[str, Any], step: int, algorithm: torch.nn.Module, extra: dict[str, Any], rngs: list
) -> None:
    """The checkpoint's results line and state; a full disk (or file-size limit) becomes one clear error."""
    try:
        append_jsonl(out / "results.jsonl", record)
        write_checkpoint(out, step, algorithm, extra, rngs)
    except (OSError, RuntimeError) as e:  # torch.save reports short writes as RuntimeError ("unexpected pos ...")
        raise UserError(
            f"cannot write step {step}'s checkpoint in {out} ({e}); free disk space (or raise the "
            "file-size limit) and rerun with --resume: the last complete checkpoint is kept"
        ) from None


def write_final_model(algorithm: torch.nn.Module, out: Path, args: TrainArgs, hp: dict, dataset) -> None:
    """Final weights as safetensors (shared submodules stored once) plus a JSON sidecar to rebuild the network."""
    tmp = out / "model.safetensors.tmp"
    save_module(algorithm, tmp)
    os.replace(tmp, out / "model.safetensors")
    meta = {
        "args": dataclasses.asdict(args),
        "hparams": hp,
        "input_shape": list(dataset.input_shape),
        "num_classes": dataset.num_classes,
        "class_names": dataset.class_names,
        "environments": dataset.environments,
    }
    atomic_write_text(out / "model.json", json.dumps(meta, indent=2))


def _records_up_to(path: Path, step: int, rewrite: bool) -> list[dict[str, Any]]:
    """The results.jsonl records up to the checkpoint's step; `rewrite` drops the later ones from the file (they are
    written again), and a last line a kill cut short."""
    lines = [line for line in (path.read_text().splitlines() if path.is_file() else []) if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:  # cut short by a kill or a full disk: written again from the checkpoint
                break
            raise UserError(
                f"{path} line {i + 1} is not JSON; repair or delete that line, then rerun with --resume"
            ) from None
        if record["step"] <= step:
            records.append(record)
    if rewrite:
        atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    return records


def _tensorboard_writer(out: Path, start_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(
            "--tensorboard needs the tensorboard package: pip install 'domainfusion[tensorboard]'"
        ) from None
    # purge_step drops events a killed run logged after its last checkpoint; they are logged again.
    return SummaryWriter(str(out / "tensorboard"), purge_step=start_step or None)
