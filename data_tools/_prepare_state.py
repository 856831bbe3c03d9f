"""Checkpoints that let an interrupted ``prepare`` continue where it stopped.

After every document that completed a shard, the state records how many
documents are done, the finished shards, and each split's tokens not yet in a
shard.  Resuming replays the corpus from that document with the same packers,
so the result is byte-identical to an uninterrupted run.  The token file and
then the JSON are each replaced atomically, the JSON last: a crash at any
moment leaves the previous or the new checkpoint, never a mix.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from megatron_sffn.data.manifest import ShardInfo, write_text_atomic

STATE_DIR = ".prepare-state"
STATE_FILE = "state.json"


@dataclass
class SplitProgress:
    shards: list[ShardInfo] = field(default_factory=list)
    documents: int = 0
    document_tokens: int = 0  # including the EOS appended to each document

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)


@dataclass
class PrepareState:
    fingerprint: str
    documents_done: int
    splits: dict[str, SplitProgress]
    checkpoint: int = 0


class StateStore:
    """The ``.prepare-state`` directory inside a dataset being built."""

    def __init__(self, out: Path) -> None:
        self.dir = out / STATE_DIR

    def load(self, fingerprint: str) -> tuple[PrepareState, dict[str, np.ndarray]] | None:
        """The last checkpoint, or None if there is none; refuses one made with other settings."""
        path = self.dir / STATE_FILE
        if not path.is_file():
            return None
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw["fingerprint"] != fingerprint:
            raise ValueError(
                f"{path}: an unfinished run with different inputs, tokenizer or settings used this output directory; "
                f"rerun with the original arguments to finish it, or delete {self.dir.parent} to start over"
            )
        splits = {
            name: SplitProgress([ShardInfo(**s) for s in sp["shards"]], sp["documents"], sp["document_tokens"])
            for name, sp in raw["splits"].items()
        }
        state = PrepareState(raw["fingerprint"], raw["documents_done"], splits, raw["checkpoint"])
        pending = {name: np.load(self.dir / self._pending_name(name, state.checkpoint)) for name in splits}
        return state, pending

    def save(self, state: PrepareState, pending: dict[str, np.ndarray]) -> None:
        state.checkpoint += 1
        self.dir.mkdir(parents=True, exist_ok=True)
        for name, tokens in pending.items():
            target = self.dir / self._pending_name(name, state.checkpoint)
            tmp = target.with_name(target.name + ".tmp")
            with open(tmp, "wb") as f:
                np.save(f, tokens.astype(np.uint32))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        write_text_atomic(self.dir / STATE_FILE, json.dumps(asdict(state), indent=1, sort_keys=True))
        for name in pending:
            (self.dir / self._pending_name(name, state.checkpoint - 1)).unlink(missing_ok=True)

    def clear(self) -> None:
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                p.unlink()
            self.dir.rmdir()

    @staticmethod
    def _pending_name(split: str, checkpoint: int) -> str:
        return f"pending-{split}-{checkpoint:06d}.npy"
