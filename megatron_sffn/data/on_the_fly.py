"""Training on raw text, tokenized in the loader workers, with the shard loader's guarantees.

The order is defined over source files and documents, never over what a
worker happens to read first, so it depends only on the files, the tokenizer,
``seed``, ``lanes`` and the settings below:

Units
    The input files in sorted order.  With fewer files than lanes each file is
    split into ``m = ceil(lanes / files)`` units by document stride (unit
    ``j`` of a file holds its documents ``d`` with ``d % m == j``), so that
    every lane has text to read; each of those lanes parses the whole file but
    tokenizes only its own documents.
Lanes
    In epoch ``e`` the units are put in a permutation drawn from
    ``(seed, e)`` and lane ``l`` reads the units at permuted positions
    ``l, l + lanes, ...``.  A lane's documents (held-out ones excluded, see
    ``packing.is_validation``), each tokenized and followed by EOS, are
    concatenated epoch after epoch without a break and cut into
    ``context_length + 1``-token samples.  Within each window of
    ``shuffle_window`` consecutive samples of a lane the order is a
    permutation drawn from ``(seed, lane, window)``.
Positions
    As for prepared shards, position ``g`` is sample ``g // lanes`` of lane
    ``g % lanes``; ranks and workers own whole lanes.

Lanes yield different numbers of samples per epoch, so epochs are counted
per lane: near the end of an epoch a global batch can mix samples of two
epochs.  No document is dropped or repeated within a lane's epoch and nothing
is padded; only the packing carries a document's tail into the next sample.

Resume: each lane's state is where its current shuffle window began and
ended (epoch, unit, document, token offset) and how many of its samples were
consumed, so a restart re-reads at most one window per lane.  Every rank
holds the state of its own lanes only: to resume at another data-parallel
size, gather the states of all ranks and combine them with
``streaming.merge_states``.

Held-out documents are materialised once per rank by
``build_text_validation_loader``: the same samples that ``prepare`` puts in
its validation split for the same settings.  This suits held-out fractions of
small or medium corpora; prepare large corpora instead.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import deque
from dataclasses import dataclass
from itertools import islice
from typing import Any, Iterator, NamedTuple

import numpy as np

from .order import UNIT_ORDER_TAG, WINDOW_ORDER_TAG, ReaderSlot, permutation
from .packing import TokenPacker, is_validation
from .streaming import Row, StreamLayout, TrainStream
from .text_sources import SourceFile, expand_inputs, iter_documents
from .tokenizer import Tokenizer, load_tokenizer
from .validation import ArrayRows, ValidationLoader

DEFAULT_SHUFFLE_WINDOW = 64
DEFAULT_BATCH_DOCUMENTS = 16


class Cursor(NamedTuple):
    """A point in a lane's document stream: skip ``offset`` tokens of the first document
    numbered ``>= document`` (in its file) that belongs to the lane's unit ``slot`` of ``epoch``."""

    epoch: int
    slot: int
    document: int
    offset: int


START = Cursor(0, 0, 0, 0)


@dataclass(frozen=True)
class TextSettings:
    """Everything besides seed and lanes that decides the sample stream."""

    files: tuple[SourceFile, ...]
    tokenizer: str
    context_length: int
    text_key: str | None = None
    eos_token: str | None = None
    validation_fraction: float = 0.005
    split_seed: int = 0  # seed of the document-hash split, as in prepare
    shuffle_window: int = DEFAULT_SHUFFLE_WINDOW
    batch_documents: int = DEFAULT_BATCH_DOCUMENTS

    def __post_init__(self) -> None:
        if not self.files:
            raise ValueError("an on-the-fly stream needs at least one input file")
        if self.context_length < 1:
            raise ValueError(f"context_length={self.context_length} must be positive")
        if self.shuffle_window < 1:
            raise ValueError(f"shuffle_window={self.shuffle_window} must be positive")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction={self.validation_fraction} must be in [0, 1)")

    @property
    def sample_length(self) -> int:
        return self.context_length + 1

    def is_held_out(self, text: str) -> bool:
        return self.validation_fraction > 0 and is_validation(text, self.validation_fraction, self.split_seed)


_TOKENIZERS: dict[tuple[str, str | None], Tokenizer] = {}


def _tokenizer(settings: TextSettings) -> Tokenizer:
    """One tokenizer per process, loaded where it is used (workers never receive a pickled one)."""
    key = (settings.tokenizer, settings.eos_token)
    if key not in _TOKENIZERS:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # parallelism comes from loader workers
        _TOKENIZERS[key] = load_tokenizer(settings.tokenizer, settings.eos_token)
    return _TOKENIZERS[key]


class _Unit(NamedTuple):
    file: int
    stride: int
    phase: int


class TextSource:
    """``RowSource`` that tokenizes raw text files lane by lane."""

    def __init__(self, settings: TextSettings, seed: int, lanes: int) -> None:
        self.settings, self.seed, self.lanes = settings, seed, lanes
        self.sample_length = settings.sample_length
        files = len(settings.files)
        stride = 1 if files >= lanes else math.ceil(lanes / files)
        self.units = [_Unit(f, stride, j) for f in range(files) for j in range(stride)]

    def lane_units(self, lane: int, epoch: int) -> list[_Unit]:
        order = permutation(len(self.units), self.seed, epoch, UNIT_ORDER_TAG)
        return [self.units[i] for i in order[lane::self.lanes]]

    def rows(self, slot: ReaderSlot, lane_state: dict[int, Any]) -> Iterator[Row]:
        readers: dict[int, Iterator[Row]] = {}
        k = 0
        while True:
            position = slot.position(k)
            lane = position % self.lanes
            if lane not in readers:
                readers[lane] = self._lane_rows(lane, position // self.lanes, lane_state.get(lane))
            yield next(readers[lane])
            k += 1

    def check_resume(self, consumed: int, lane_state: dict[int, Any]) -> None:
        for lane in range(self.lanes):
            expected = max(0, -((lane - consumed) // self.lanes))
            saved = lane_state.get(lane)
            count = saved["count"] if saved is not None else 0
            if count != expected:
                raise ValueError(
                    f"loader state for lane {lane} says {count} samples were consumed, but consumed_samples="
                    f"{consumed} means {expected}; text-stream states of all ranks must be combined with "
                    f"merge_states before resuming at another data-parallel size"
                )

    def _lane_rows(self, lane: int, count: int, saved: dict[str, Any] | None) -> Iterator[Row]:
        """Samples of ``lane`` from its ``count``-th on, each carrying the lane state after it."""
        window_size = self.settings.shuffle_window
        skip = count % window_size
        if saved is None:
            start = START
        else:
            start = Cursor(*(saved["window_start"] if skip else saved["window_end"]))
        samples = self._lane_samples(lane, start)
        window = count // window_size
        while True:
            batch = [next(samples) for _ in range(window_size)]
            window_end = batch[-1][1]
            order = permutation(window_size, self.seed, lane, window, WINDOW_ORDER_TAG)
            for i in order[skip:]:
                count += 1
                state = {"count": count, "window_start": list(start), "window_end": list(window_end)}
                yield Row(batch[i][0], True, lane, cursor=state)
            start, skip, window = window_end, 0, window + 1

    def _lane_samples(self, lane: int, start: Cursor) -> Iterator[tuple[np.ndarray, Cursor]]:
        """The lane's samples in stream order from ``start``, each with the cursor just after it."""
        length = self.sample_length
        tokenizer = _tokenizer(self.settings)
        packer = TokenPacker(length, tokenizer.eos_id)
        spans: deque[tuple[Cursor, int]] = deque()  # pending documents: (cursor of first pending token, tokens left)
        for docs in self._document_batches(lane, start):
            texts = [text for _, text in docs]
            for (cursor, _), ids in zip(docs, tokenizer.encode_batch(texts)):
                ids = ids[cursor.offset:]
                packer.add_document(ids)
                spans.append((cursor, len(ids) + 1))
            taken = packer.take(packer.pending_tokens // length)
            for sample in taken if taken is not None else []:
                yield sample, _advance(spans, length)

    def _document_batches(self, lane: int, start: Cursor) -> Iterator[list[tuple[Cursor, str]]]:
        batch: list[tuple[Cursor, str]] = []
        for item in self.lane_documents(lane, start):
            batch.append(item)
            if len(batch) == self.settings.batch_documents:
                yield batch
                batch = []

    def lane_documents(self, lane: int, start: Cursor) -> Iterator[tuple[Cursor, str]]:
        """The lane's training documents from ``start`` on, endlessly, epoch after epoch."""
        epoch, slot, first_doc, offset = start
        while True:
            found = False
            units = self.lane_units(lane, epoch)
            for slot in range(slot, len(units)):
                unit = units[slot]
                source = self.settings.files[unit.file]
                for number, doc in enumerate(iter_documents([source], self.settings.text_key)):
                    if number < first_doc or number % unit.stride != unit.phase:
                        continue
                    if self.settings.is_held_out(doc.text):
                        continue
                    found = True
                    yield Cursor(epoch, slot, number, offset), doc.text
                    offset = 0
                first_doc = 0
            if not found and start.epoch < epoch:
                raise ValueError(
                    f"lane {lane} found no training document in epoch {epoch} (its units: "
                    f"{[(self.settings.files[u.file].path, u.phase) for u in units]}); the corpus is too small "
                    f"for {self.lanes} lanes: use fewer lanes or more files"
                )
            epoch, slot = epoch + 1, 0


def _advance(spans: deque[tuple[Cursor, int]], tokens: int) -> Cursor:
    """Consume ``tokens`` from the pending documents; the cursor of the next token to come."""
    last = None
    while tokens:
        cursor, left = spans[0]
        used = min(tokens, left)
        tokens -= used
        if used == left:
            last = spans.popleft()[0]
        else:
            spans[0] = (cursor._replace(offset=cursor.offset + used), left - used)
    if spans:
        return spans[0][0]
    # The sample ended exactly with a document: resume at the next document of the same unit.
    assert last is not None
    return last._replace(document=last.document + 1, offset=0)


def text_settings(files: list[str] | list[SourceFile], tokenizer: str, context_length: int, **options: Any) -> TextSettings:
    """``TextSettings`` for paths, globs or directories (expanded and sorted as ``prepare`` does)."""
    if all(isinstance(f, SourceFile) for f in files):
        sources = list(files)
    else:
        sources = expand_inputs([str(f) for f in files])
    return TextSettings(tuple(sources), str(tokenizer), context_length, **options)


def build_text_train_loader(
    files: list[str] | list[SourceFile],
    *,
    tokenizer: str,
    context_length: int,
    micro_batch_size: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    num_workers: int = 0,
    seed: int = 1234,
    lanes: int = 8,
    text_key: str | None = None,
    eos_token: str | None = None,
    validation_fraction: float = 0.005,
    split_seed: int = 0,
    shuffle_window: int = DEFAULT_SHUFFLE_WINDOW,
    batch_documents: int = DEFAULT_BATCH_DOCUMENTS,
    prefetch_factor: int = 2,
    pin_memory: bool = False,
) -> TrainStream:
    """The endless training stream of rank ``dp_rank`` over raw parquet / JSONL / text files.

    ``validation_fraction`` and ``split_seed`` hold out the same documents as
    ``prepare`` does with ``--validation-fraction`` / ``--seed``.
    """
    settings = text_settings(files, tokenizer, context_length, text_key=text_key, eos_token=eos_token,
                             validation_fraction=validation_fraction, split_seed=split_seed,
                             shuffle_window=shuffle_window, batch_documents=batch_documents)
    layout = StreamLayout(micro_batch_size, dp_rank, dp_size, num_workers, prefetch_factor, pin_memory)
    identity = {"source": "text", "seed": seed, "data": _fingerprint(settings)}
    return TrainStream(TextSource(settings, seed, lanes), layout, identity, lanes,
                       chunk_rows=max(1, min(64, (1 << 16) // settings.sample_length)))


def build_text_validation_loader(
    files: list[str] | list[SourceFile],
    *,
    tokenizer: str,
    context_length: int,
    micro_batch_size: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    text_key: str | None = None,
    eos_token: str | None = None,
    validation_fraction: float = 0.005,
    split_seed: int = 0,
    batches_multiple_of: int = 1,
    pin_memory: bool = False,
) -> ValidationLoader:
    """The held-out documents of the files, packed as ``prepare`` packs its validation split."""
    settings = text_settings(files, tokenizer, context_length, text_key=text_key, eos_token=eos_token,
                             validation_fraction=validation_fraction, split_seed=split_seed)
    layout = StreamLayout(micro_batch_size, dp_rank, dp_size, 0, 2, pin_memory)
    return ValidationLoader(ArrayRows(held_out_samples(settings)), layout, batches_multiple_of)


def held_out_samples(settings: TextSettings) -> np.ndarray:
    """Every held-out document, in file order, EOS-terminated, concatenated and cut into samples
    (the trailing partial sample is dropped, as ``prepare`` does)."""
    tokenizer = _tokenizer(settings)
    packer = TokenPacker(settings.sample_length, tokenizer.eos_id)
    texts = (doc.text for doc in iter_documents(list(settings.files), settings.text_key) if settings.is_held_out(doc.text))
    while batch := list(islice(texts, settings.batch_documents)):
        for ids in tokenizer.encode_batch(batch):
            packer.add_document(ids)
    samples, _ = packer.take_all()
    return samples


def _fingerprint(settings: TextSettings) -> str:
    """Identifies what decides the stream: file names and sizes, tokenizer definition, packing and split."""
    described = {
        "files": [[os.path.basename(f.path), os.path.getsize(f.path)] for f in settings.files],
        "tokenizer": _tokenizer(settings).sha256,
        "context_length": settings.context_length,
        "text_key": settings.text_key,
        "split": [settings.validation_fraction, settings.split_seed],
        "shuffle_window": settings.shuffle_window,
    }
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()[:16]
