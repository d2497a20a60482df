"""A run's output folder: one writer at a time, and a previous run's results kept until the new run replaces them.

Rules (docs/protocol.md, "Output folders"):
- One process trains in a folder at a time: rank 0 holds an exclusive `flock` on `OUTPUT_DIR/.lock` (which names its
  owner) for the whole run. The kernel drops the lock when the process dies, even by SIGKILL, so a stale lock never
  needs clearing by hand.
- A run that starts over (`--overwrite` on a finished run, or an interrupted run without `--resume`) first moves the
  previous run's files into `OUTPUT_DIR/.replaced/`. They go back if the new run fails before its first checkpoint,
  and are deleted once that checkpoint is on disk. A kill in between leaves `.replaced/`, which the next run in the
  folder restores before anything else.
- Leftovers of writes a kill interrupted (`*.tmp`) are removed under the lock.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import IO

from .checkpoint import CHECKPOINT
from .errors import UserError
from .utils import retired

LOCK = ".lock"
REPLACED = ".replaced"
# What a run leaves in its folder, apart from synthetic pools (rebuilt by a fresh run, restored from the checkpoint on
# resume) and a launcher's logs.
RUN_FILES = (
    "results.jsonl",
    "done",
    "model.safetensors",
    "model.json",
    "args.json",
    "skipped_images.txt",
    "tensorboard",
    CHECKPOINT,
    retired(Path(CHECKPOINT)).name,
)


class OutputDir:
    """The folder of one run, held by this process from `acquire` to `release`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock: IO[str] | None = None
        self._created: list[Path] = []  # folders acquire made, deepest first

    def acquire(self) -> None:
        """Create the folder, check it is writable, take its lock and undo what a killed process left half done."""
        try:
            self._created = [p for p in (self.path, *self.path.parents) if not p.exists()]
            self.path.mkdir(parents=True, exist_ok=True)
            lock = open(self.path / LOCK, "a+")
        except OSError as e:
            raise UserError(f"--output-dir {self.path} is not writable ({e.strerror}); choose another folder") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            owner = lock.read().strip() or "another process"
            lock.close()
            raise UserError(
                f"{self.path} is in use by {owner}; wait for that run to end, or choose another --output-dir"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        lock.flush()
        self._lock = lock
        if self.restore_replaced():
            print(
                f"restored the previous run's files in {self.path}: the run that was replacing them was killed "
                "before its first checkpoint",
                file=sys.stderr,
            )
        self._remove_partial_writes()

    def release(self) -> None:
        """Drop the lock; a folder this process created and left holding nothing but the lock goes too (a run that
        failed on its inputs leaves no trace)."""
        if self._lock is None:
            return
        if self._created and [p.name for p in self.path.iterdir()] == [LOCK]:
            try:
                (self.path / LOCK).unlink()
                for folder in self._created:
                    folder.rmdir()
            except OSError:  # something else appeared meanwhile: it stays, and so does its folder
                pass
        self._lock.close()
        self._lock = None

    def __enter__(self) -> OutputDir:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def set_aside(self) -> list[str]:
        """Move the previous run's files into `.replaced/` (kept until `discard_replaced`); returns their names."""
        moved = [name for name in RUN_FILES if (self.path / name).exists()]
        if moved:
            (self.path / REPLACED).mkdir()
            for name in moved:
                os.replace(self.path / name, self.path / REPLACED / name)
        return moved

    def restore_replaced(self) -> bool:
        """Put set-aside files back over whatever the failed new run wrote; False when nothing was set aside."""
        kept = self.path / REPLACED
        if not kept.is_dir():
            return False
        for name in RUN_FILES:
            if (self.path / name).is_dir():
                shutil.rmtree(self.path / name)
            else:
                (self.path / name).unlink(missing_ok=True)
        for entry in kept.iterdir():
            os.replace(entry, self.path / entry.name)
        kept.rmdir()
        return True

    def discard_replaced(self) -> None:
        """The new run has a checkpoint: the files it replaces go."""
        shutil.rmtree(self.path / REPLACED, ignore_errors=True)

    def _remove_partial_writes(self) -> None:
        """Temp files and folders of atomic writes (`utils.atomic_write_text`, `publish_dir`) a kill interrupted."""
        for tmp in self.path.glob("*.tmp"):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()
