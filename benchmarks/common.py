"""Shared by the benchmark scripts: machine description, running CLI commands, writing dated reports."""

from __future__ import annotations

import datetime as dt
import shlex
import subprocess
import sys
import time
from pathlib import Path

from domainfusion.utils import machine_description

REPO = Path(__file__).resolve().parents[1]
REPORTS = REPO / "benchmarks" / "reports"
CLI = [sys.executable, "-m", "domainfusion"]


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"


def run(args: list[str]) -> tuple[str, float]:
    """Run a domainfusion CLI command, echoing it; return (stdout, wall seconds). Fails loudly on error."""
    cmd = CLI + args
    print("+", shlex.join(cmd), flush=True)
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"command failed with exit code {proc.returncode}: {shlex.join(cmd)}")
    return proc.stdout, time.time() - start


def write_report(name: str, command: str, body: str) -> Path:
    """benchmarks/reports/<date>-<name>.md with the exact command, machine and commit above the results."""
    today = dt.date.today().isoformat()
    REPORTS.mkdir(parents=True, exist_ok=True)
    path = REPORTS / f"{today}-{name}.md"
    header = (
        f"# {name} ({today})\n\n"
        f"- command: `{command}`\n- machine: {machine_description()}\n- commit: {git_commit()}\n\n"
    )
    path.write_text(header + body)
    print(f"wrote {path}")
    return path
