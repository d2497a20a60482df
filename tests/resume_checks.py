"""What a resumed run must keep, for the tests that kill runs: the results.jsonl lines up to its checkpoint.

Comparing a resumed run's records with an uninterrupted run's cannot tell a resume from a silent restart at step 0
(the records are identical by design); the kept lines can, since their `step_time` values differ from run to run.
"""

from __future__ import annotations

import json
from pathlib import Path

from domainfusion.checkpoint import CHECKPOINT


def kept_lines(out: Path) -> list[str]:
    """The results.jsonl lines, as written, up to the step of the checkpoint now in `out` (none before the first
    checkpoint, or while one is being replaced): a resumed run keeps them byte for byte. Safe on a running run."""
    try:
        step = json.loads((out / CHECKPOINT / "state.json").read_text())["step"]
    except FileNotFoundError:
        return []
    lines = [line for line in (out / "results.jsonl").read_text().splitlines(keepends=True) if line.endswith("\n")]
    return [line for line in lines if json.loads(line)["step"] <= step]


def keeps_lines(out: Path, kept: list[str]) -> bool:
    """Whether results.jsonl in `out` still starts with the lines `kept_lines` returned before an interruption."""
    return (out / "results.jsonl").read_text().splitlines(keepends=True)[: len(kept)] == kept
