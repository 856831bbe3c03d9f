"""One deterministic pass over the held-out split, each sample exactly once across ranks.

The split, in its stored order, is cut into ``dp_size * max(workers, 1)``
contiguous parts of near-equal size; worker ``w`` of rank ``r`` reads part
``r * workers + w`` (so every shard is read by at most two readers) and
yields it as micro-batches.  Every part yields the same number of batches,
``ceil(largest part / micro_batch_size)``, so all ranks run the same number of
evaluation steps (a rank that ran out early would hang the others in a
collective).  The missing rows of the last batches are padding: all-zero
tokens with ``loss_mask`` 0, which a per-token-normalised loss ignores.  With
``batches_multiple_of`` (megatron's micro-batches per step) whole padding
batches are appended until the count divides evenly.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Protocol

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .batches import make_batch, pin_batch
from .order import balanced_ranges
from .sharded import read_or_report
from .streaming import Chunk, LoaderStats, StreamLayout, rebatch, worker_rounds
from .tar_shards import SampleFormat, ShardSpec


class SplitRows(Protocol):
    """Random access to a held-out split by ranges of rows."""

    samples: int
    sample_length: int

    def pieces(self, begin: int, end: int) -> Iterator[Chunk]:
        """Rows ``[begin, end)`` in order, in one or more chunks."""
        ...


class ShardRows:
    """A prepared split; a skipped bad shard gives masked rows (reported in the chunk's events)."""

    def __init__(self, shards: list[ShardSpec], fmt: SampleFormat, skip_bad_shards: bool) -> None:
        self.shards, self.fmt, self.skip_bad_shards = shards, fmt, skip_bad_shards
        self.samples = sum(s.samples for s in shards)
        self.sample_length = fmt.sample_length

    def pieces(self, begin: int, end: int) -> Iterator[Chunk]:
        for spec in self.shards:
            lo, hi = max(begin, spec.first_index), min(end, spec.first_index + spec.samples)
            if lo >= hi:
                continue
            data, event = read_or_report(spec, self.fmt, self.skip_bad_shards)
            if data is None:
                piece = padding(hi - lo, self.sample_length)
                piece.events[0] = event
                yield piece
            else:
                rows = torch.from_numpy(data[lo - spec.first_index:hi - spec.first_index].astype(np.int32))
                yield Chunk(rows, torch.ones(hi - lo, dtype=torch.bool), [], [], [None] * (hi - lo))


class ArrayRows:
    """A held-out split already in memory as a ``(samples, sample_length)`` array."""

    def __init__(self, rows: np.ndarray) -> None:
        self.rows = rows
        self.samples, self.sample_length = rows.shape

    def pieces(self, begin: int, end: int) -> Iterator[Chunk]:
        if end > begin:
            yield Chunk(torch.from_numpy(self.rows[begin:end].astype(np.int32)), torch.ones(end - begin, dtype=torch.bool),
                        [], [], [None] * (end - begin))


def padding(rows: int, sample_length: int) -> Chunk:
    """Masked all-zero rows that keep batch shapes equal on every rank."""
    return Chunk(torch.zeros((rows, sample_length), dtype=torch.int32), torch.zeros(rows, dtype=torch.bool), [], [],
                 [None] * rows)


class _PartDataset(IterableDataset):
    """Runs in each worker: the micro-batches of its part of the split, padded to ``batches`` batches."""

    def __init__(self, split: SplitRows, layout: StreamLayout, batches: int) -> None:
        self.split, self.layout, self.batches = split, layout, batches

    def __iter__(self) -> Iterator[Chunk]:
        lay = self.layout
        info = get_worker_info()
        workers = max(lay.num_workers, 1)
        parts = balanced_ranges(self.split.samples, lay.dp_size * workers)
        begin, end = parts[lay.dp_rank * workers + (info.id if info else 0)]
        size, length = lay.micro_batch_size, self.split.sample_length
        produced = 0
        for rows in rebatch(self.split.pieces(begin, end), size):
            produced += 1
            yield rows if len(rows) == size else Chunk.concat([rows, padding(size - len(rows), length)])
        for _ in range(produced, self.batches):
            yield padding(size, length)


class ValidationLoader:
    """The held-out pass of one data-parallel rank; iterate it once per evaluation."""

    def __init__(self, split: SplitRows, layout: StreamLayout, batches_multiple_of: int = 1) -> None:
        if batches_multiple_of <= 0:
            raise ValueError(f"batches_multiple_of={batches_multiple_of} must be positive")
        self.split, self.layout = split, layout
        self.samples = split.samples
        self.stats = LoaderStats()
        parts = layout.dp_size * max(layout.num_workers, 1)
        self._part_batches = math.ceil(math.ceil(self.samples / parts) / layout.micro_batch_size)
        reader_batches = self._part_batches * max(layout.num_workers, 1)
        self._batches = math.ceil(reader_batches / batches_multiple_of) * batches_multiple_of

    def __len__(self) -> int:
        """Micro-batches this rank yields per pass (the same on every rank)."""
        return self._batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        lay = self.layout
        produced = 0
        if self._part_batches:
            dataset = _PartDataset(self.split, lay, self._part_batches)
            for group in worker_rounds(dataset, lay.num_workers, lay.prefetch_factor):
                for chunk in group:
                    produced += 1
                    yield self._batch(chunk)
        for _ in range(self._batches - produced):
            yield self._batch(padding(lay.micro_batch_size, self.split.sample_length))

    def _batch(self, chunk: Chunk) -> dict[str, Any]:
        self.stats.record(chunk.events)
        self.stats.masked_samples += int((~chunk.valid).sum())
        batch = make_batch(chunk.tokens, chunk.valid)
        return pin_batch(batch) if self.layout.pin_memory else batch
