"""The on-disk protocol that makes a checkpoint visible only once it is complete.

Layout under ``<run_dir>/checkpoints``::

    latest                    one line: the name of the newest complete checkpoint
    step_0000200/             complete checkpoints, one directory per saved step
    .partial.step_0000300/    a save in progress (or one killed mid-way)
    .deleting.step_0000100/   a checkpoint being removed by retention

A save writes into ``.partial.<name>``; only after every rank has finished
writing does rank 0 rename it to ``<name>`` and then replace ``latest``
(temporary file, fsync, rename).  Renames within one directory are atomic on
POSIX file systems, so at every instant ``latest`` names a directory that was
fully written: a process killed at any point of a save leaves the previous
checkpoint untouched and at worst a ``.partial.*`` directory, which
:meth:`CheckpointDirs.clean_stale` removes on the next start.  Retention
renames a checkpoint to ``.deleting.*`` before deleting it, so a half-deleted
directory never carries a checkpoint's name.

This module is pure file handling (no torch, no process groups): callers
decide which rank calls what and put barriers between the steps.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from ..atomic_io import fsync_dir, write_text_atomic  # noqa: F401  (re-exported for callers)

LATEST_FILE = "latest"
PARTIAL_PREFIX = ".partial."
DELETING_PREFIX = ".deleting."
_STEP_NAME = re.compile(r"^step_(\d{7,})$")


def step_dir_name(step: int) -> str:
    """Zero-padded so that names sort like steps in a directory listing."""
    if step < 0:
        raise ValueError(f"checkpoint step={step} must be >= 0")
    return f"step_{step:07d}"


def step_of(name: str) -> int | None:
    """The step encoded in a checkpoint directory name, or None for any other name."""
    match = _STEP_NAME.match(name)
    return int(match.group(1)) if match else None


class CheckpointDirs:
    """Names, commit and retention of the checkpoints in one directory."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    # -- reading ---------------------------------------------------------------

    def committed(self) -> list[tuple[int, Path]]:
        """Complete checkpoints as ``(step, path)``, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            step = step_of(entry.name)
            if step is not None and entry.is_dir():
                found.append((step, entry))
        return sorted(found)

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names, or None when nothing was ever committed.

        A pointer naming a missing directory is an error rather than a fresh
        start: silently restarting from step 0 would overwrite a run's history.
        """
        pointer = self.root / LATEST_FILE
        if not pointer.exists():
            return None
        name = pointer.read_text(encoding="utf-8").strip()
        if step_of(name) is None:
            raise ValueError(f"{pointer}: expected a checkpoint name like 'step_0000100', found {name!r}")
        path = self.root / name
        if not path.is_dir():
            raise ValueError(
                f"{pointer} names {name!r}, but {path} does not exist; restore it, point {LATEST_FILE} at one of "
                f"{[p.name for _, p in self.committed()] or 'no other checkpoint'}, or remove {pointer} to start over"
            )
        return path

    # -- writing (rank 0 only, with barriers around, see the module docstring) ---

    def partial_path(self, step: int) -> Path:
        return self.root / f"{PARTIAL_PREFIX}{step_dir_name(step)}"

    def begin(self, step: int) -> Path:
        """A fresh, empty directory to write the checkpoint of ``step`` into."""
        self.root.mkdir(parents=True, exist_ok=True)
        partial = self.partial_path(step)
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir()
        return partial

    def commit(self, step: int) -> Path:
        """Publish the partial checkpoint of ``step``: rename it, then point ``latest`` at it.

        Re-saving a step that already has a checkpoint (a run resumed from an
        earlier one) replaces it; the old copy is moved aside first, so the
        name never refers to a mixture of the two.
        """
        partial = self.partial_path(step)
        if not partial.is_dir():
            raise FileNotFoundError(f"no partial checkpoint to commit at {partial}")
        final = self.root / step_dir_name(step)
        if final.exists():
            self._remove(final)
        os.replace(partial, final)
        fsync_dir(self.root)
        write_text_atomic(self.root / LATEST_FILE, final.name + "\n")
        return final

    def prune(self, keep_last: int | None) -> list[Path]:
        """Delete all but the newest ``keep_last`` checkpoints (None keeps all); returns what was removed.

        The checkpoint ``latest`` names is never removed, whatever its age.
        """
        if keep_last is None:
            return []
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last} must be >= 1 (or None to keep every checkpoint)")
        latest = self.latest()
        removed = []
        for _, path in self.committed()[:-keep_last]:
            if latest is not None and path.name == latest.name:
                continue
            self._remove(path)
            removed.append(path)
        return removed

    def clean_stale(self) -> list[Path]:
        """Remove what interrupted saves and deletions left behind; returns the removed paths."""
        if not self.root.is_dir():
            return []
        stale = [p for p in self.root.iterdir() if p.name.startswith((PARTIAL_PREFIX, DELETING_PREFIX))]
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        return stale

    def _remove(self, path: Path) -> None:
        doomed = path.with_name(DELETING_PREFIX + path.name)
        if doomed.exists():
            shutil.rmtree(doomed)
        os.replace(path, doomed)
        shutil.rmtree(doomed)
