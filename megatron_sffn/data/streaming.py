"""A rank's share of the global stream, read by torch DataLoader workers in exact order.

Each worker reads the positions ``reader_slot`` assigns it (see ``order``)
and sends them in chunks of ``chunk_rows`` rows.  DataLoader hands out worker
outputs round-robin (worker 0, 1, ..., W-1, 0, ...), and the rank's ``i``-th
position belongs to worker ``i % W`` as its ``i // W``-th row, so interleaving
one chunk from each worker restores the rank's positions in increasing order.
Batches are cut from that sequence afterwards, which is why the sample order
depends on neither the worker count nor the micro-batch size.

The loader counts what it *hands to the trainer*, never what workers have
prefetched, so ``state_dict()`` taken between two batches resumes at exactly
the next sample.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Iterable, Iterator, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .batches import make_batch, pin_batch
from .order import ReaderSlot, check_lanes, reader_slot

STATE_FORMAT = "megatron-sffn/loader-state-v1"
LOGGED_DOCUMENTS = 5  # skipped documents logged one by one per loader; later ones are counted
log = logging.getLogger(__name__)


@dataclass
class Row:
    """One stream position as a reader produced it."""

    tokens: np.ndarray  # [context_length + 1]
    valid: bool  # False: a stand-in for a sample that could not be read (masked out)
    lane: int
    cursor: Any = None  # where the lane resumes after this row (text sources only)
    event: dict[str, Any] | None = None  # what was skipped to produce this row (a bad shard, bad documents)


class RowSource(Protocol):
    """Something that can read any reader's positions of the global stream."""

    sample_length: int

    def rows(self, slot: ReaderSlot, lane_state: dict[int, Any]) -> Iterator[Row]:
        """The rows at ``slot``'s positions, in order; ``lane_state`` holds saved lane cursors."""
        ...

    def check_resume(self, consumed: int, lane_state: dict[int, Any]) -> None:
        """Raise ``ValueError`` unless ``lane_state`` is a consistent resume point at ``consumed``."""
        ...


@dataclass
class Chunk:
    """Consecutive rows of one reader, in the form that crosses the worker boundary.

    ``events`` has one entry per row (None for most), so that an event is
    counted exactly when its row is handed out, however chunks are cut.
    """

    tokens: torch.Tensor  # int32 [rows, sample_length]
    valid: torch.Tensor  # bool [rows]
    lanes: list[int]
    cursors: list[Any]
    events: list[dict[str, Any] | None]

    @classmethod
    def of(cls, rows: list[Row]) -> "Chunk":
        tokens = torch.from_numpy(np.stack([r.tokens for r in rows]).astype(np.int32))
        return cls(
            tokens=tokens,
            valid=torch.tensor([r.valid for r in rows], dtype=torch.bool),
            lanes=[r.lane for r in rows],
            cursors=[r.cursor for r in rows],
            events=[r.event for r in rows],
        )

    def __len__(self) -> int:
        return int(self.valid.shape[0])

    def slice(self, start: int, stop: int) -> "Chunk":
        return Chunk(self.tokens[start:stop], self.valid[start:stop], self.lanes[start:stop],
                     self.cursors[start:stop], self.events[start:stop])

    @staticmethod
    def interleave(chunks: list["Chunk"]) -> "Chunk":
        """Row ``k * len(chunks) + w`` of the result is row ``k`` of ``chunks[w]``."""
        if len(chunks) == 1:
            return chunks[0]
        rows = min(len(c) for c in chunks)
        if any(len(c) != rows for c in chunks):
            raise RuntimeError(f"loader workers sent chunks of unequal sizes {[len(c) for c in chunks]}")
        order = [(k, w) for k in range(rows) for w in range(len(chunks))]
        return Chunk(
            tokens=torch.stack([c.tokens for c in chunks], dim=1).reshape(rows * len(chunks), -1),
            valid=torch.stack([c.valid for c in chunks], dim=1).reshape(-1),
            lanes=[chunks[w].lanes[k] for k, w in order],
            cursors=[chunks[w].cursors[k] for k, w in order],
            events=[chunks[w].events[k] for k, w in order],
        )

    @staticmethod
    def concat(chunks: list["Chunk"]) -> "Chunk":
        return Chunk(
            tokens=torch.cat([c.tokens for c in chunks]),
            valid=torch.cat([c.valid for c in chunks]),
            lanes=[x for c in chunks for x in c.lanes],
            cursors=[x for c in chunks for x in c.cursors],
            events=[e for c in chunks for e in c.events],
        )


class _ReaderDataset(IterableDataset):
    """Runs inside each DataLoader worker: reads that worker's positions, ``chunk_rows`` at a time."""

    def __init__(self, source: RowSource, start: int, rank: int, dp_size: int, num_workers: int,
                 chunk_rows: int, lane_state: dict[int, Any]) -> None:
        self.source, self.start, self.rank, self.dp_size = source, start, rank, dp_size
        self.num_workers, self.chunk_rows, self.lane_state = num_workers, chunk_rows, lane_state

    def __iter__(self) -> Iterator[Chunk]:
        info = get_worker_info()
        slot = reader_slot(self.start, self.rank, self.dp_size, info.id if info else 0, self.num_workers)
        rows = self.source.rows(slot, self.lane_state)
        while chunk := list(islice(rows, self.chunk_rows)):
            yield Chunk.of(chunk)


def keep_as_is(item: Any) -> Any:
    """DataLoader ``collate_fn`` that leaves ``Chunk`` objects untouched (picklable, unlike a lambda)."""
    return item


def worker_rounds(dataset: IterableDataset, num_workers: int, prefetch_factor: int) -> Iterator[list[Any]]:
    """Items of ``dataset`` grouped as one item from each worker, in worker order."""
    if num_workers == 0:
        for item in dataset:
            yield [item]
        return
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, prefetch_factor=prefetch_factor,
                        collate_fn=keep_as_is, in_order=True)
    items = iter(loader)
    try:
        while group := list(islice(items, num_workers)):
            yield group
    finally:
        # A worker's exception keeps the iterator alive in its traceback until a
        # garbage-collection pass, which tears its queues down before the workers
        # hear they should stop (each then costs a 5 s join timeout).  Stop them now.
        shutdown = getattr(items, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def rebatch(chunks: Iterable[Chunk], size: int) -> Iterator[Chunk]:
    """Re-cut a sequence of chunks into chunks of exactly ``size`` rows (the last may be shorter).

    Rows are sliced as views; only a batch that spans chunk boundaries is copied.
    """
    pending: deque[Chunk] = deque()
    buffered = 0
    for chunk in chunks:
        if len(chunk):
            pending.append(chunk)
            buffered += len(chunk)
        while buffered >= size:
            yield _take(pending, size)
            buffered -= size
    if buffered:
        yield _take(pending, buffered)


def _take(pending: deque[Chunk], rows: int) -> Chunk:
    parts = []
    while rows:
        head = pending[0]
        if len(head) <= rows:
            parts.append(pending.popleft())
            rows -= len(head)
        else:
            parts.append(head.slice(0, rows))
            pending[0] = head.slice(rows, len(head))
            rows = 0
    return parts[0] if len(parts) == 1 else Chunk.concat(parts)


@dataclass
class LoaderStats:
    """Counters of what the loader had to mask, saved in the loader state.

    Each rank counts what it reads; ``merge_states`` sums the ranks' counters.
    """

    masked_samples: int = 0  # stand-in rows handed to the trainer
    bad_shard_reads: int = 0  # failed shard or raw-file reads (one can be read by several lanes)
    bad_shards: dict[str, str] = field(default_factory=dict)  # shard or raw file -> first error seen
    skipped_documents: int = 0  # unreadable raw-text documents left out (each epoch counts again)

    def record(self, events: list[dict[str, Any] | None]) -> None:
        for event in events:
            if event is None:
                continue
            for error in event.get("skipped_documents", ()):
                self.skipped_documents += 1
                if self.skipped_documents <= LOGGED_DOCUMENTS:
                    more = "; further ones are only counted" if self.skipped_documents == LOGGED_DOCUMENTS else ""
                    log.warning("skipping bad document: %s%s", error, more)
            if "shard" in event:
                self._bad_read(event["shard"], event["error"], "bad shard (its samples are masked out)")
            for path, error in event.get("bad_files", ()):
                self._bad_read(path, error, "unreadable file (its documents are left out)")

    def _bad_read(self, name: str, error: str, what: str) -> None:
        self.bad_shard_reads += 1
        if name not in self.bad_shards:
            self.bad_shards[name] = error
            log.warning("skipping %s: %s", what, error)

    def add(self, other: "LoaderStats") -> None:
        self.masked_samples += other.masked_samples
        self.bad_shard_reads += other.bad_shard_reads
        self.bad_shards = {**other.bad_shards, **self.bad_shards}
        self.skipped_documents += other.skipped_documents

    def to_dict(self) -> dict[str, Any]:
        return {"masked_samples": self.masked_samples, "bad_shard_reads": self.bad_shard_reads,
                "bad_shards": dict(self.bad_shards), "skipped_documents": self.skipped_documents}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "LoaderStats":
        return cls(raw["masked_samples"], raw["bad_shard_reads"], dict(raw["bad_shards"]),
                   raw.get("skipped_documents", 0))


@dataclass(frozen=True)
class StreamLayout:
    """Who this loader is and how it cuts batches; none of it changes the global order."""

    micro_batch_size: int
    dp_rank: int = 0
    dp_size: int = 1
    num_workers: int = 0
    prefetch_factor: int = 2
    pin_memory: bool = False

    def __post_init__(self) -> None:
        if self.micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size={self.micro_batch_size} must be positive")
        if not 0 <= self.dp_rank < self.dp_size:
            raise ValueError(f"dp_rank={self.dp_rank} must be in [0, dp_size={self.dp_size})")
        if self.num_workers < 0:
            raise ValueError(f"num_workers={self.num_workers} must be >= 0")


class TrainStream:
    """The endless training loader of one data-parallel rank.

    ``identity`` (seed, lanes and a fingerprint of the data) is stored in the
    state and must match on load: resuming a position under another order
    would silently repeat and skip samples.
    """

    def __init__(self, source: RowSource, layout: StreamLayout, identity: dict[str, Any], lanes: int,
                 chunk_rows: int) -> None:
        check_lanes(lanes, layout.dp_size, layout.num_workers)
        self.source, self.layout, self.identity, self.lanes = source, layout, identity, lanes
        self.chunk_rows = chunk_rows
        self.consumed_samples = 0  # global positions consumed by all ranks together
        self.stats = LoaderStats()
        self._lane_state: dict[int, Any] = {}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Batches from the current resume point on; a new ``iter()`` restarts from the latest state."""
        lay = self.layout
        dataset = _ReaderDataset(self.source, self.consumed_samples, lay.dp_rank, lay.dp_size, lay.num_workers,
                                 self.chunk_rows, dict(self._lane_state))
        rounds = worker_rounds(dataset, lay.num_workers, lay.prefetch_factor)
        for rows in rebatch((Chunk.interleave(group) for group in rounds), lay.micro_batch_size):
            self._consume(rows)
            batch = make_batch(rows.tokens, rows.valid)
            yield pin_batch(batch) if lay.pin_memory else batch
        raise RuntimeError("the training stream ended; every source of training positions is endless")

    def _consume(self, rows: Chunk) -> None:
        self.stats.record(rows.events)
        self.consumed_samples += len(rows) * self.layout.dp_size
        self.stats.masked_samples += int((~rows.valid).sum())
        for lane, cursor in zip(rows.lanes, rows.cursors):
            if cursor is not None:
                self._lane_state[lane] = cursor

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable resume point, valid when every rank has consumed the same number of batches.

        Only the lanes this rank reads are in it: the cursors of other lanes,
        loaded at a resume, go stale as their new owners read on.
        """
        lay = self.layout
        owned = {lane: cursor for lane, cursor in self._lane_state.items() if lane % lay.dp_size == lay.dp_rank}
        return {
            "format": STATE_FORMAT,
            **self.identity,
            "lanes": self.lanes,
            "consumed_samples": self.consumed_samples,
            "lane_state": {str(lane): cursor for lane, cursor in sorted(owned.items())},
            "stats": self.stats.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state`` (from any dp size or worker count); the next ``iter()`` starts there."""
        expected = {"format": STATE_FORMAT, **self.identity, "lanes": self.lanes}
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(
                    f"loader state key {key!r} is {state.get(key)!r}, this loader has {value!r}; "
                    f"resuming under another data order would repeat and skip samples"
                )
        consumed = state.get("consumed_samples")
        if not isinstance(consumed, int) or consumed < 0:
            raise ValueError(f"loader state key 'consumed_samples' is {consumed!r}, expected an integer >= 0")
        lane_state = {int(lane): cursor for lane, cursor in state.get("lane_state", {}).items()}
        self.source.check_resume(consumed, lane_state)
        self.consumed_samples = consumed
        self._lane_state = lane_state
        # Saved counters may be a sum over ranks (merge_states): only rank 0 carries
        # them on, so that summing the ranks' counters again counts each event once.
        saved = LoaderStats.from_dict(state.get("stats", LoaderStats().to_dict()))
        self.stats = saved if self.layout.dp_rank == 0 else LoaderStats(bad_shards=saved.bad_shards)


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine the states of all ranks into one that any rank count can load.

    Prepared-shard positions are the same on every rank; text-source states
    each hold only their own lanes' cursors, so resuming at another dp size
    needs all of them.  A lane found in two states is an error: each lane has
    one owner, and a second cursor could only be a stale copy.  Counters are
    summed over ranks.
    """
    if not states:
        raise ValueError("merge_states needs the state of at least one rank")
    first = states[0]
    for i, state in enumerate(states[1:], start=1):
        for key in first:
            if key not in ("lane_state", "stats") and state.get(key) != first[key]:
                raise ValueError(
                    f"rank states disagree: key {key!r} is {first[key]!r} in state 0 and {state.get(key)!r} in "
                    f"state {i}; states must come from one step with every rank in lockstep"
                )
    stats = LoaderStats()
    lane_state: dict[str, Any] = {}
    owner: dict[str, int] = {}
    for i, state in enumerate(states):
        for lane, cursor in state["lane_state"].items():
            if lane in lane_state and lane_state[lane] != cursor:
                raise ValueError(
                    f"rank states {owner[lane]} and {i} hold different cursors for lane {lane}; each lane is read "
                    f"by one rank, so pass each rank's own state_dict() once"
                )
            lane_state[lane], owner[lane] = cursor, i
        stats.add(LoaderStats.from_dict(state["stats"]))
    return {**first, "lane_state": dict(sorted(lane_state.items(), key=lambda kv: int(kv[0]))), "stats": stats.to_dict()}
