"""Rows of a prepared split, read shard by shard in the global order.

Each lane keeps the one shard it is currently reading in memory, so a reader
holds at most ``lanes / (dp_size * workers)`` shards at a time whatever the
corpus size.  With ``skip_bad_shards`` a shard that fails to read is reported
once per lane that reaches it and its rows become masked stand-ins (see
``batches``): positions never shift, so the order, the batch shapes and exact
resume all survive a bad shard.  Without it the ``ShardError`` stops training.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from .order import ReaderSlot, ShardedOrder
from .streaming import Row
from .tar_shards import SampleFormat, ShardError, ShardSpec, read_shard


def read_or_report(spec: ShardSpec, fmt: SampleFormat, skip_bad_shards: bool) -> tuple[np.ndarray | None, dict[str, Any] | None]:
    """The shard's rows, or with ``skip_bad_shards`` ``None`` and a report of why it could not be read."""
    try:
        return read_shard(spec, fmt), None
    except ShardError as exc:
        if not skip_bad_shards:
            raise
        return None, {"shard": spec.url, "error": str(exc)}


class ShardSource:
    """``RowSource`` over the shards of one prepared split."""

    def __init__(self, shards: list[ShardSpec], fmt: SampleFormat, seed: int, lanes: int, skip_bad_shards: bool) -> None:
        self.shards, self.fmt, self.skip_bad_shards = shards, fmt, skip_bad_shards
        self.sample_length = fmt.sample_length
        self.order = ShardedOrder([s.samples for s in shards], seed, lanes)

    def rows(self, slot: ReaderSlot, lane_state: dict[int, Any]) -> Iterator[Row]:
        current: dict[int, tuple[int, np.ndarray | None]] = {}  # lane -> (shard, its rows or None if bad)
        stand_in = np.zeros(self.sample_length, dtype=self.fmt.dtype)
        k = 0
        while True:
            ref = self.order.locate(slot.position(k))
            event = None
            if ref.lane not in current or current[ref.lane][0] != ref.shard:
                data, event = read_or_report(self.shards[ref.shard], self.fmt, self.skip_bad_shards)
                current[ref.lane] = (ref.shard, data)
            data = current[ref.lane][1]
            if data is None:
                yield Row(stand_in, False, ref.lane, event=event)
            else:
                yield Row(data[ref.row], True, ref.lane)
            k += 1

    def check_resume(self, consumed: int, lane_state: dict[int, Any]) -> None:
        if lane_state:
            raise ValueError(f"loader state has lane cursors for lanes {sorted(lane_state)}, "
                             f"but a prepared dataset resumes from consumed_samples alone")
