"""Per-rank, full-precision record of every step, for reproducibility checks.

TensorBoard stores scalars as 32-bit floats and only on one rank; comparing
a resumed run with an uninterrupted one, or two parallel layouts, needs the
exact loss of every step and a fingerprint of the data each rank consumed.
Set ``debug.step_trace=<dir>`` (or ``SFFN_STEP_TRACE=<dir>`` on the command
line) and each rank appends one JSON line per step to
``<dir>/rank<global rank>.jsonl``: step, loss (as ``repr`` of a float,
which round-trips exactly), learning rate, gradient and parameter norms, whether
the update was skipped, the SHA-256 of the token ids this rank trained on, and a
short digest of each of its samples (interleaving the ranks' lists by position
gives the global batch, so runs at different data-parallel sizes compare).
Evaluations add ``{"eval_step": ..., "val_loss": ...}`` lines.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch


def tokens_digest(batches: list[dict[str, Any]]) -> str:
    """SHA-256 over the ``tokens`` of the micro-batches of one step, in order."""
    digest = hashlib.sha256()
    for batch in batches:
        digest.update(batch["tokens"].to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def sample_digests(batches: list[dict[str, Any]]) -> list[str]:
    """The first 16 hex digits of the SHA-256 of each sample's ``tokens``, in the order trained on."""
    return [
        hashlib.sha256(row.contiguous().numpy().tobytes()).hexdigest()[:16]
        for batch in batches
        for row in batch["tokens"].to(torch.int64)
    ]


class StepTrace:
    """Appends records to this rank's trace file; a no-op when tracing is off."""

    def __init__(self, global_rank: int, directory: str | None) -> None:
        self.path = Path(directory) / f"rank{global_rank}.jsonl" if directory else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def write(self, **record: Any) -> None:
        if self.path is None:
            return
        encoded = {k: repr(v) if isinstance(v, float) else v for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(encoded) + "\n")


def read_trace(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of one trace file, floats restored exactly."""
    records = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            record = json.loads(line)
            for key, value in record.items():
                if isinstance(value, str) and key in ("loss", "lr", "grad_norm", "params_norm", "val_loss"):
                    record[key] = float(value)
            records.append(record)
    return records
