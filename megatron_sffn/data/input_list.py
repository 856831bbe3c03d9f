"""A run's raw input files, resolved once from its patterns and recorded in the run directory.

A glob over remote storage (``hf://datasets/.../*.parquet``, ``s3://...``)
lists whatever is there when it is expanded; files added, removed or renamed
later would change a resumed run's units and so its whole order.  The first
start therefore writes the sorted list beside the checkpoints
(``<run_dir>/data_inputs.json``), and every later start reads that list.  A
resume still lists the patterns again and says what changed, but keeps the
recorded files.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..atomic_io import write_text_atomic
from .text_sources import SourceFile, expand_inputs

INPUT_LIST_FILE = "data_inputs.json"
log = logging.getLogger(__name__)


def record_inputs(patterns: list[str], run_dir: str | Path) -> list[SourceFile]:
    """The run's files: resolved and written at the first start, the recorded ones at a resume.

    At a resume the patterns are resolved again; a list that differs from the
    recorded one is reported (files added and removed) and the recorded one is used.
    """
    path = Path(run_dir) / INPUT_LIST_FILE
    recorded = _load(path, patterns)
    if recorded is None:
        files = expand_inputs(patterns)
        path.parent.mkdir(parents=True, exist_ok=True)
        document = {"patterns": list(patterns), "files": [[f.path, f.format] for f in files]}
        write_text_atomic(path, json.dumps(document, indent=1) + "\n")
        return files
    try:
        fresh = expand_inputs(patterns)
    except (OSError, ValueError) as exc:
        log.warning("data.raw %s cannot be listed again (%s); using the %d files recorded in %s",
                    patterns, exc, len(recorded), path)
        return recorded
    if fresh != recorded:
        now, then = {f.path for f in fresh}, {f.path for f in recorded}
        log.warning(
            "data.raw %s now resolves to %d files (new: %s; gone: %s); this run keeps the %d files "
            "recorded in %s at its first start", patterns, len(fresh), _some(now - then), _some(then - now),
            len(recorded), path,
        )
    return recorded


def recorded_inputs(patterns: list[str], run_dir: str | Path) -> list[SourceFile]:
    """The files recorded for this run, or (before its first start wrote them) the patterns resolved now."""
    recorded = _load(Path(run_dir) / INPUT_LIST_FILE, patterns)
    return expand_inputs(patterns) if recorded is None else recorded


def _load(path: Path, patterns: list[str]) -> list[SourceFile] | None:
    if not path.is_file():
        return None
    document = json.loads(path.read_text(encoding="utf-8"))
    if document.get("patterns") != list(patterns):
        raise ValueError(
            f"{path}: this run's files were resolved from data.raw={document.get('patterns')!r}, but data.raw is "
            f"now {list(patterns)!r}; a resume must read the same files (use a new run_dir for other data)"
        )
    return [SourceFile(p, fmt) for p, fmt in document["files"]]


def _some(paths: set[str], shown: int = 3) -> str:
    listed = ", ".join(sorted(paths)[:shown])
    return (listed + (f" and {len(paths) - shown} more" if len(paths) > shown else "")) or "none"
