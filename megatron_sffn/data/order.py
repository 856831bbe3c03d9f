"""The global sample order: which sample fills each position of the training stream.

The training stream is an endless sequence of positions ``g = 0, 1, 2, ...``.
Everything that decides what sits at a position is a function of
``(seed, lanes)`` and the dataset alone; data-parallel ranks, loader workers,
micro- and global-batch sizes only decide *who reads* a position.  That is what
makes a run reproducible at any parallel layout and its resume exact after the
layout changes.

Lanes
    Position ``g`` belongs to lane ``g % lanes``.  Rank ``r`` of ``R`` owns the
    positions ``g % R == r`` (hence whole lanes, since ``R`` divides ``lanes``),
    and worker ``w`` of that rank's ``W`` loader workers owns the rank's
    positions ``g % (R * W) == r + R * w``.  So each reader touches only its
    own lanes' data (no read amplification from parallelism), every position is
    read by exactly one reader, and a rank's stream is its positions in
    increasing order.  ``lanes`` must be a multiple of ``R * W``; it is a
    dataset setting, not a parallel one.

Epochs (prepared shards)
    Epoch ``e`` occupies exactly the positions ``[e*N, (e+1)*N)`` for a split of
    ``N`` samples, so every sample is used exactly once per epoch: nothing is
    dropped or padded at the boundary.  The epoch's *virtual sequence* is the
    shards in a permutation drawn from ``(seed, e)``, each shard's samples in a
    permutation drawn from ``(seed, e, shard)``.  The lane's positions within
    the epoch read one contiguous segment of that sequence (the segments are
    laid out in lane order, sized by how many of the epoch's positions fall in
    each lane), so a lane reads about ``N / lanes`` consecutive samples, shard
    by shard, and a shard is read by more than one lane only where a segment
    boundary cuts it: at most one extra shard read per lane and epoch, which
    also makes corpora with fewer shards than lanes work unchanged.

Permutations are argsorts of a SplitMix64 hash of the key and index, so they
are the same on every platform and every numpy version: a checkpoint taken on
one machine resumes bit-exactly on another.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# Domain tags keep the permutations of different things independent even when
# their other key parts coincide.
SHARD_ORDER_TAG = 1
SAMPLE_ORDER_TAG = 2
UNIT_ORDER_TAG = 3
WINDOW_ORDER_TAG = 4

_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (wrap-around arithmetic is intended)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hash_key(*parts: int) -> int:
    """A 64-bit hash of a tuple of integers, chained so that order matters."""
    h = np.zeros(1, dtype=np.uint64)
    for part in parts:
        h = _splitmix64(h ^ np.array([part & _MASK64], dtype=np.uint64))
    return int(h[0])


def permutation(n: int, *key: int) -> np.ndarray:
    """A permutation of ``range(n)`` determined by ``key`` alone (int64 array)."""
    draws = _splitmix64(np.arange(n, dtype=np.uint64) + np.uint64(hash_key(*key)))
    return np.argsort(draws, kind="stable").astype(np.int64)


@dataclass(frozen=True)
class ReaderSlot:
    """The positions one reader (a rank's worker) owns, from a resume point on.

    The reader's ``k``-th position is ``first + k * step``.
    """

    first: int
    step: int

    def position(self, k: int) -> int:
        return self.first + k * self.step


def check_lanes(lanes: int, dp_size: int, num_workers: int) -> None:
    """Refuse a parallel layout whose readers would not own whole lanes."""
    readers = dp_size * max(num_workers, 1)
    if lanes <= 0 or lanes % readers:
        raise ValueError(
            f"lanes={lanes} must be a positive multiple of data-parallel size x loader workers = "
            f"{dp_size} x {max(num_workers, 1)} = {readers}; choose lanes as a multiple of the largest "
            f"dp_size x num_workers you will run with"
        )


def reader_slot(start: int, rank: int, dp_size: int, worker: int, num_workers: int) -> ReaderSlot:
    """Positions read by ``worker`` of rank ``rank`` when the stream resumes at ``start``.

    Rank ``r`` takes the positions ``>= start`` with ``g % dp_size == r``; its
    ``i``-th one goes to worker ``i % num_workers``.  With ``num_workers == 0``
    the rank reads everything itself, like a single worker.
    """
    if not 0 <= rank < dp_size:
        raise ValueError(f"rank={rank} must be in [0, dp_size={dp_size})")
    workers = max(num_workers, 1)
    if not 0 <= worker < workers:
        raise ValueError(f"worker={worker} must be in [0, {workers})")
    rank_first = start + (rank - start) % dp_size
    return ReaderSlot(first=rank_first + dp_size * worker, step=dp_size * workers)


@dataclass(frozen=True)
class SampleRef:
    """Where the sample at a stream position lives: shard ``shard``, row ``row`` of the tar."""

    epoch: int
    lane: int
    shard: int
    row: int


@dataclass(frozen=True)
class _EpochPlan:
    lane_first: np.ndarray  # first position of each lane in the epoch
    lane_segment: np.ndarray  # start of each lane's segment in the virtual sequence
    shard_order: np.ndarray  # shard ids in reading order
    shard_starts: np.ndarray  # virtual index where each shard (in reading order) begins


class ShardedOrder:
    """The order over a prepared split: position -> (shard, row)."""

    def __init__(self, shard_sizes: list[int], seed: int, lanes: int) -> None:
        if not shard_sizes or min(shard_sizes) <= 0:
            raise ValueError(f"a split needs at least one non-empty shard, got shard sizes {shard_sizes}")
        if lanes <= 0:
            raise ValueError(f"lanes={lanes} must be positive")
        self.shard_sizes = np.asarray(shard_sizes, dtype=np.int64)
        self.seed = seed
        self.lanes = lanes
        self.epoch_samples = int(self.shard_sizes.sum())
        self._make_caches()

    def _make_caches(self) -> None:
        self._plan = lru_cache(maxsize=2)(self._make_plan)
        # One entry per lane a reader may be in the middle of, plus the next epoch's.
        self._rows = lru_cache(maxsize=2 * self.lanes)(self._make_row_order)

    def __getstate__(self) -> dict:
        """Caches stay behind when the order is sent to a spawned loader worker."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_plan", "_rows")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._make_caches()

    def locate(self, position: int) -> SampleRef:
        n, lanes = self.epoch_samples, self.lanes
        epoch, lane = position // n, position % lanes
        plan = self._plan(epoch)
        virtual = int(plan.lane_segment[lane]) + (position - int(plan.lane_first[lane])) // lanes
        slot = int(np.searchsorted(plan.shard_starts, virtual, side="right")) - 1
        shard = int(plan.shard_order[slot])
        offset = virtual - int(plan.shard_starts[slot])
        return SampleRef(epoch=epoch, lane=lane, shard=shard, row=int(self._rows(epoch, shard)[offset]))

    def _make_row_order(self, epoch: int, shard: int) -> np.ndarray:
        """Order in which a shard's rows are read in ``epoch``."""
        return permutation(int(self.shard_sizes[shard]), self.seed, epoch, shard, SAMPLE_ORDER_TAG)

    def _make_plan(self, epoch: int) -> _EpochPlan:
        n, lanes = self.epoch_samples, self.lanes
        begin = epoch * n
        lane_ids = np.arange(lanes, dtype=np.int64)
        lane_first = begin + (lane_ids - begin) % lanes
        # Positions of lane l in [begin, begin + n): lane_first[l], +lanes, ... (possibly none).
        counts = np.maximum(0, (begin + n - lane_first + lanes - 1) // lanes)
        lane_segment = np.concatenate([[0], np.cumsum(counts)[:-1]])
        shard_order = permutation(len(self.shard_sizes), self.seed, epoch, SHARD_ORDER_TAG)
        sizes = self.shard_sizes[shard_order]
        shard_starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        return _EpochPlan(lane_first, lane_segment, shard_order, shard_starts)


def balanced_ranges(total: int, parts: int) -> list[tuple[int, int]]:
    """Split ``range(total)`` into ``parts`` contiguous ranges whose sizes differ by at most one."""
    base, extra = divmod(total, parts)
    bounds = [0]
    for p in range(parts):
        bounds.append(bounds[-1] + base + (1 if p < extra else 0))
    return list(zip(bounds[:-1], bounds[1:]))
