"""Load DomainBed-format sweep results and group them the way DomainBed's reporting does.

A sweep directory holds one folder per run, each with an append-only `results.jsonl` (one JSON record per
checkpoint) and a `done` marker once the run finished. Runs may still be going or may have been killed, so a
half-written last line is expected: it is skipped with a warning rather than aborting the whole report.

DomainBed's names alone (dataset, algorithm) can put incomparable runs in one cell: `split_incomparable` renames them
apart first; grouping, tables and plots go through it, and `domainfusion results` passes its renamed records on.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError

Record = dict[str, Any]

# The `args` keys that grouping and model selection read; a record without them cannot be placed in a table.
_REQUIRED_ARGS = ("dataset", "algorithm", "test_envs", "trial_seed", "hparams_seed")


@dataclass
class RecordGroup:
    """All records of one (trial_seed, dataset, algorithm, test_env) cell, across hparam seeds and steps."""

    trial_seed: int
    dataset: str
    algorithm: str
    test_env: int
    records: list[Record]


def load_records(path: str | os.PathLike) -> list[Record]:
    """Read every `results.jsonl` below `path` (sorted, so the output order does not depend on the filesystem).

    Hidden folders are skipped: `.replaced/` holds a run that a running replacement may still discard or restore.
    """
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"{root} is not a directory: pass the sweep output directory that holds one folder per run.")
    records: list[Record] = []
    for results_path in sorted(root.rglob("results.jsonl")):
        if not any(part.startswith(".") for part in results_path.relative_to(root).parts):
            records.extend(_read_results(results_path))
    return records


def _read_results(path: Path) -> list[Record]:
    """Parse one run's records, skipping (with a warning) lines a killed or running job left unusable."""
    records: list[Record] = []
    try:
        # errors="replace": a write cut inside a multi-byte character must not abort the read.
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError as e:
        warnings.warn(f"skipping {path}: {e}", stacklevel=3)
        return records
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            where = "last line" if lineno == len(lines) else "line"
            warnings.warn(f"skipping malformed {where} {path}:{lineno} (partial write?)", stacklevel=3)
            continue
        if not _is_record(record):
            warnings.warn(
                f"skipping {path}:{lineno}: not a DomainBed record (needs 'step' and args {', '.join(_REQUIRED_ARGS)})",
                stacklevel=3,
            )
            continue
        records.append(record)
    return records


def _is_record(obj: Any) -> bool:
    """True when `obj` has the fields grouping and selection index, so later stages cannot hit a KeyError."""
    return (
        isinstance(obj, dict)
        and "step" in obj
        and isinstance(obj.get("args"), dict)
        and all(key in obj["args"] for key in _REQUIRED_ARGS)
    )


def row_name(args: dict) -> str:
    """What result tables call a run: its `variant` when it has one, else its algorithm."""
    return args.get("variant") or args["algorithm"]


def split_incomparable(records: Iterable[Record]) -> list[Record]:
    """Rename apart runs that share a dataset or row name but must not be averaged or selected among together.

    - A folder dataset (ImageFolder, PACS, ...: any not built from packaged data) trained on several data folders
      becomes one dataset per folder, "ImageFolder (data/vlcs)": its name says nothing about which domains, classes
      and images the runs saw. RotatedMNIST, ColoredMNIST and DigitsDG are the same data in every folder, so their
      sweeps from several machines still merge.
    - Runs of one row (algorithm or `--variant`) on one dataset with different `--hparams` overrides become one row
      per override, 'ERM {"lr": 0.01}' (runs without overrides keep the plain name): selection compares the random
      search's draws (hparams seeds) of one configuration, not configurations. `--variant` gives them short names.

    Renamed records are shallow copies with new `args`; the others are returned as they are, and a second pass
    changes nothing. Raises UserError when runs on one data folder list different domains (the folder changed).
    """
    records = list(records)
    folder = [_data_folder(r["args"]["dataset"], r["args"].get("data_dir")) for r in records]
    override = [_overrides(r["args"].get("hparams")) for r in records]
    folders: dict[str, set[str | None]] = defaultdict(set)
    for record, f in zip(records, folder):
        folders[record["args"]["dataset"]].add(f)
    datasets = [
        f"{r['args']['dataset']} ({f})" if len(folders[r["args"]["dataset"]]) > 1 else r["args"]["dataset"]
        for r, f in zip(records, folder)
    ]
    overrides: dict[tuple[str, str], set[str]] = defaultdict(set)
    domains: dict[str, dict[tuple[str, ...], str]] = defaultdict(dict)
    for record, dataset, o in zip(records, datasets, override):
        overrides[(dataset, row_name(record["args"]))].add(o)
        if record.get("environments"):
            domains[dataset].setdefault(tuple(record["environments"]), record["args"].get("output_dir", "?"))
    for dataset, seen in domains.items():
        if len(seen) > 1:
            (a, run_a), (b, run_b) = list(seen.items())[:2]
            raise UserError(
                f"runs of {dataset} list different domains ({', '.join(a)} in {run_a}; {', '.join(b)} in "
                f"{run_b}): the data folder changed between runs, so their accuracies are not comparable. "
                "Move the older runs out of the results folder, or rerun them"
            )
    out = []
    for record, dataset, o in zip(records, datasets, override):
        args = record["args"]
        name = f"{row_name(args)} {o}" if o and len(overrides[(dataset, row_name(args))]) > 1 else row_name(args)
        same = dataset == args["dataset"] and name == row_name(args)
        out.append(record if same else {**record, "args": {**args, "dataset": dataset, "variant": name}})
    return out


@functools.cache
def _data_folder(dataset: str, data_dir: str | None) -> str | None:
    """The folder a folder dataset's images came from (normalised, so 'data/x/' and 'data/x' agree); None for
    datasets whose content does not depend on the folder."""
    from ..data import DATASETS  # lazily: it imports torch, which the report itself does not need

    packaged = not DATASETS.get(dataset, "image_folder:").startswith("image_folder:")
    return None if packaged or not data_dir else os.path.normpath(data_dir)


@functools.cache
def _overrides(text: str | None) -> str:
    """`--hparams` overrides as canonical JSON ('' for none), so spacing and key order do not split rows."""
    try:
        value = json.loads(text) if text else None
    except json.JSONDecodeError:
        return text
    return json.dumps(value, sort_keys=True) if value else ""


def group_records(records: Iterable[Record]) -> list[RecordGroup]:
    """Group by (trial_seed, dataset, algorithm or variant (`row_name`), test_env) like DomainBed's
    `get_grouped_records`, after `split_incomparable`.

    A record trained with test_envs [i, j] lands in both group i and group j: leave-one-domain-out selection
    for test env i needs the runs that also held out j.
    """
    groups: dict[tuple[int, str, str, int], list[Record]] = defaultdict(list)
    for record in split_incomparable(records):
        args = record["args"]
        for test_env in args["test_envs"]:
            groups[(args["trial_seed"], args["dataset"], row_name(args), test_env)].append(record)
    return [RecordGroup(*key, records=groups[key]) for key in sorted(groups)]


def num_envs(record: Record) -> int:
    """Count environments as DomainBed does: consecutive `env{i}_out_acc` keys starting at 0."""
    n = 0
    while f"env{n}_out_acc" in record:
        n += 1
    return n
