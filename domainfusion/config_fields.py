"""Which settings leave a run's result unchanged, declared once on each dataclass field, and the one comparison that
decides whether a saved run may continue under the current settings.

`train.TrainArgs` and `ldm.train_config.LDMTrainConfig` mark such fields with `result_free(...)`; their resume checks,
and the sweep's job folder names and per-job flags, are derived from the marks, so a new field is classified in one
place.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import Any

_KEY = "result_free"


class ResultFree(enum.Enum):
    """Why a field does not change a run's result; the sweep treats the kinds differently."""

    PLACEMENT = "placement"  # where the run executes (folder, device, loader workers): not in sweep folder names
    INVOCATION = "invocation"  # how one command treats its folder and terminal: a sweep sets these itself
    LOGGING = "logging"  # extra outputs beside the results


def result_free(kind: ResultFree, **field_kwargs: Any) -> Any:
    """A dataclass field that may differ between a run and its resumption without changing its result."""
    return dataclasses.field(metadata={_KEY: kind}, **field_kwargs)


def result_free_fields(cls: type, *kinds: ResultFree) -> tuple[str, ...]:
    """`cls`'s result-free fields of `kinds` (all kinds if none are named), in declaration order."""
    return tuple(
        f.name for f in dataclasses.fields(cls) if _KEY in f.metadata and (not kinds or f.metadata[_KEY] in kinds)
    )


def changed_fields(saved: dict[str, Any], current: Any, defaults: Any) -> list[str]:
    """The fields, result-free ones aside, in which the dataclass `current` differs from `saved` (its JSON as an
    earlier run wrote it), sorted. Compared as JSON, so a value equals its own saved copy (tuples read back as
    lists); a field the saved run lacks (one added since) counts as its value in `defaults`."""
    ignore = set(result_free_fields(type(current)))
    now = json.loads(json.dumps(dataclasses.asdict(current)))
    default = json.loads(json.dumps(dataclasses.asdict(defaults)))
    return sorted(k for k in now if k not in ignore and saved.get(k, default[k]) != now[k])
