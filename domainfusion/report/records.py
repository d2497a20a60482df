"""Load DomainBed-format sweep results and group them the way DomainBed's reporting does.

A sweep directory holds one folder per run, each with an append-only `results.jsonl` (one JSON record per
checkpoint) and a `done` marker once the run finished. Runs may still be going or may have been killed, so a
half-written last line is expected: it is skipped with a warning rather than aborting the whole report.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from domainfusion.errors import UserError

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
    """Read every `results.jsonl` below `path` (sorted, so the output order does not depend on the filesystem)."""
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"{root} is not a directory: pass the sweep output directory that holds one folder per run.")
    records: list[Record] = []
    for results_path in sorted(root.rglob("results.jsonl")):
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
            warnings.warn(f"skipping {path}:{lineno}: not a DomainBed record (needs 'step' and args "
                          f"{', '.join(_REQUIRED_ARGS)})", stacklevel=3)
            continue
        records.append(record)
    return records


def _is_record(obj: Any) -> bool:
    """True when `obj` has the fields grouping and selection index, so later stages cannot hit a KeyError."""
    return (isinstance(obj, dict) and "step" in obj and isinstance(obj.get("args"), dict)
            and all(key in obj["args"] for key in _REQUIRED_ARGS))


def row_name(args: dict) -> str:
    """What result tables call a run: its `variant` when it has one, else its algorithm."""
    return args.get("variant") or args["algorithm"]


def group_records(records: Iterable[Record]) -> list[RecordGroup]:
    """Group by (trial_seed, dataset, algorithm or variant (`row_name`), test_env) like DomainBed's
    `get_grouped_records`.

    A record trained with test_envs [i, j] lands in both group i and group j: leave-one-domain-out selection
    for test env i needs the runs that also held out j.
    """
    groups: dict[tuple[int, str, str, int], list[Record]] = defaultdict(list)
    for record in records:
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
