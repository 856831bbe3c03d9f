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
consumed, so a restart re-reads at most one window per lane.  A cursor's
document is the one just after the lane's previous training document, so a
restart re-reads the held-out and bad documents in between.

Bad documents (see ``text_sources``) stop the stream, or with
``bad_documents="skip"`` are left out and counted: each with the sample that
holds the first token of the lane's next training document, so the count
is exact across restarts (``LoaderStats.skipped_documents``).  A file that
cannot be read (a remote one failing for good: 404, 401/403, retries
exhausted; a damaged parquet file) stops the stream naming it, or with
``skip_bad_files`` its documents (from the point of failure on) are left out
of every lane that reads it, and each such lane-epoch is counted like a bad
shard (``LoaderStats.bad_shards`` / ``bad_shard_reads``) in the same way.  Every rank
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
import logging
import math
import os
from collections import deque
from dataclasses import dataclass, replace
from itertools import islice
from typing import Any, Iterator, NamedTuple

import numpy as np

from .order import UNIT_ORDER_TAG, WINDOW_ORDER_TAG, ReaderSlot, permutation
from .packing import PackingSettings, TokenPacker
from .streaming import Row, StreamLayout, TrainStream
from .text_sources import (
    FILE_SKIP_HINT,
    SKIP_HINT,
    UNREADABLE_FILE_ERRORS,
    BadDocument,
    Document,
    Record,
    SourceError,
    SourceFile,
    content_signature,
    expand_inputs,
    numbered_records,
    source_name,
)
from .tokenizer import Tokenizer, load_tokenizer
from .validation import ArrayRows, ValidationLoader

log = logging.getLogger(__name__)
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


@dataclass(frozen=True, kw_only=True)
class TextSettings(PackingSettings):
    """Everything besides seed and lanes that decides the sample stream (skipped bad documents are counted in
    the loader's stats)."""

    files: tuple[SourceFile, ...]
    shuffle_window: int = DEFAULT_SHUFFLE_WINDOW
    batch_documents: int = DEFAULT_BATCH_DOCUMENTS
    skip_bad_files: bool = False  # leave out (and count) files that cannot be read instead of stopping

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.files:
            raise ValueError("an on-the-fly stream needs at least one input file")
        if self.shuffle_window < 1:
            raise ValueError(f"shuffle_window={self.shuffle_window} must be positive")


_TOKENIZERS: dict[tuple[str, str | None], Tokenizer] = {}


def _tokenizer(settings: TextSettings) -> Tokenizer:
    """One tokenizer per process, loaded where it is used (workers never receive a pickled one)."""
    key = (settings.tokenizer, settings.eos_token)
    if key not in _TOKENIZERS:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # parallelism comes from loader workers
        _TOKENIZERS[key] = load_tokenizer(settings.tokenizer, settings.eos_token)
    return _TOKENIZERS[key]


class Skipped(NamedTuple):
    """A bad document (``file`` None) or an unreadable file left out of a lane's stream, and why."""

    error: str
    file: str | None = None


class BadFile(NamedTuple):
    """The record in place of the rest of a file that cannot be read (``skip_bad_files``)."""

    error: str


class _Unit(NamedTuple):
    file: int
    stride: int
    phase: int


class LaneDocument(NamedTuple):
    """A training document of a lane, as read from a cursor."""

    cursor: Cursor  # resume point that reads this document on, from token ``cursor.offset``
    at: Cursor  # where the document itself is: its epoch, unit slot and number in its file
    text: str
    skipped: list[Skipped]  # bad documents and files met since the lane's previous training document


class _Span:
    """A document's tokens still to be packed into samples (mutable: consumed from the front)."""

    __slots__ = ("cursor", "left", "after", "skipped")

    def __init__(self, cursor: Cursor, left: int, after: Cursor, skipped: list[Skipped]) -> None:
        self.cursor, self.left, self.after, self.skipped = cursor, left, after, skipped


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
                yield Row(batch[i][0], True, lane, cursor=state, event=_skip_event(batch[i][2]))
            start, skip, window = window_end, 0, window + 1

    def _lane_samples(self, lane: int, start: Cursor) -> Iterator[tuple[np.ndarray, Cursor, list[Skipped]]]:
        """The lane's samples in stream order from ``start``, each with the cursor just after it and the
        bad documents counted with it."""
        length = self.sample_length
        tokenizer = _tokenizer(self.settings)
        packer = TokenPacker(length, tokenizer.eos_id)
        spans: deque[_Span] = deque()  # pending documents, from their first pending token
        for docs in self._document_batches(lane, start):
            for doc, ids in zip(docs, tokenizer.encode_batch([doc.text for doc in docs])):
                ids = ids[doc.cursor.offset:]
                packer.add_document(ids)
                after = doc.at._replace(document=doc.at.document + 1)
                spans.append(_Span(doc.cursor, len(ids) + 1, after, doc.skipped))
            taken = packer.take(packer.pending_tokens // length)
            for sample in taken if taken is not None else []:
                yield sample, *_advance(spans, length)

    def _document_batches(self, lane: int, start: Cursor) -> Iterator[list[LaneDocument]]:
        batch: list[LaneDocument] = []
        for item in self.lane_documents(lane, start):
            batch.append(item)
            if len(batch) == self.settings.batch_documents:
                yield batch
                batch = []

    def lane_documents(self, lane: int, start: Cursor) -> Iterator[LaneDocument]:
        """The lane's training documents from ``start`` on, endlessly, epoch after epoch."""
        epoch, slot, first_doc, offset = start
        resume = start  # just after the previous training document
        skipped: list[Skipped] = []
        while True:
            found = False
            units = self.lane_units(lane, epoch)
            for slot in range(slot, len(units)):
                unit = units[slot]
                source = self.settings.files[unit.file]
                for number, record in file_records(self.settings, source, first_doc):
                    if isinstance(record, BadFile):
                        skipped.append(Skipped(record.error, source.path))
                        continue
                    if number < first_doc or number % unit.stride != unit.phase:
                        continue
                    if isinstance(record, BadDocument):
                        skipped.append(Skipped(_bad_document(self.settings, record)))
                        continue
                    if self.settings.is_held_out(record.text):
                        continue
                    found = True
                    # Resuming inside the document: its first sample, and with it the skipped ones, came before.
                    at = Cursor(epoch, slot, number, 0)
                    yield LaneDocument(resume._replace(offset=offset), at, record.text, [] if offset else skipped)
                    resume, offset, skipped = at._replace(document=number + 1), 0, []
                first_doc = 0
            if not found and start.epoch < epoch:
                raise ValueError(
                    f"lane {lane} found no training document in epoch {epoch} (its units: "
                    f"{[(self.settings.files[u.file].path, u.phase) for u in units]}); the corpus is too small "
                    f"for {self.lanes} lanes: use fewer lanes or more files"
                )
            epoch, slot = epoch + 1, 0


def file_records(settings: TextSettings, source: SourceFile,
                 first_document: int = 0) -> Iterator[tuple[int, Record | BadFile]]:
    """``numbered_records`` of one file; a file that cannot be read (on) raises unless ``skip_bad_files``,
    and then ends with one ``BadFile`` (numbered -1)."""
    try:
        yield from numbered_records(source, settings.text_key, first_document)
    except UNREADABLE_FILE_ERRORS as exc:
        if not settings.skip_bad_files:
            raise SourceError(f"{exc}; {FILE_SKIP_HINT}") from exc
        yield -1, BadFile(str(exc))


def _bad_document(settings: TextSettings, record: BadDocument) -> str:
    """The error of a bad document to skip; it stops the stream unless ``bad_documents="skip"``."""
    if settings.bad_documents == "error":
        raise SourceError(f"{record.error}; {SKIP_HINT}")
    return record.error


def _skip_event(skipped: list[Skipped]) -> dict[str, Any] | None:
    """The loader event counting what a sample's lane left out (see ``LoaderStats.record``)."""
    if not skipped:
        return None
    return {"skipped_documents": [s.error for s in skipped if s.file is None],
            "bad_files": [[s.file, s.error] for s in skipped if s.file is not None]}


def _advance(spans: deque[_Span], tokens: int) -> tuple[Cursor, list[Skipped]]:
    """Consume ``tokens`` from the pending documents: the cursor of the next token to come, and the
    skipped documents counted with this sample (those before each document it starts)."""
    last, skipped = None, []
    while tokens:
        span = spans[0]
        skipped += span.skipped
        span.skipped = []
        used = min(tokens, span.left)
        tokens -= used
        if used == span.left:
            last = spans.popleft()
        else:
            span.cursor, span.left = span.cursor._replace(offset=span.cursor.offset + used), span.left - used
    if spans:
        return spans[0].cursor, skipped
    # The sample ended exactly with a document: resume just after it.
    assert last is not None
    return last.after, skipped


def text_settings(files: list[str] | list[SourceFile], tokenizer: str, context_length: int, **options: Any) -> TextSettings:
    """``TextSettings`` for paths, globs or directories (expanded and sorted as ``prepare`` does)."""
    if all(isinstance(f, SourceFile) for f in files):
        sources = list(files)
    else:
        sources = expand_inputs([str(f) for f in files])
    return TextSettings(files=tuple(sources), tokenizer=str(tokenizer), context_length=context_length, **options)


def build_text_train_loader(settings: TextSettings, layout: StreamLayout, *, seed: int = 1234,
                            lanes: int = 8) -> TrainStream:
    """The endless training stream of rank ``layout.dp_rank`` over raw parquet / JSONL / text files.

    ``settings`` (see ``text_settings``) hold out the same documents as
    ``prepare`` does with the same ``--validation-fraction`` / ``--seed``;
    ``bad_documents`` is ``prepare``'s ``--bad-documents``; ``skip_bad_files``
    leaves out and counts files that cannot be read (``data.skip_bad_shards``).
    """
    identity = {"source": "text", "seed": seed, "data": _fingerprint(settings)}
    return TrainStream(TextSource(settings, seed, lanes), layout, identity, lanes,
                       chunk_rows=max(1, min(64, (1 << 16) // settings.sample_length)))


def build_text_validation_loader(settings: TextSettings, layout: StreamLayout, *,
                                 batches_multiple_of: int = 1) -> ValidationLoader:
    """The held-out documents of the files, packed as ``prepare`` packs its validation split.

    The samples are materialised in this process, so ``layout``'s worker count is not used.
    Skipped bad documents and files are counted by the training stream, which reads every file too.
    """
    in_process = replace(layout, num_workers=0)
    return ValidationLoader(ArrayRows(held_out_samples(settings)), in_process, batches_multiple_of)


def held_out_samples(settings: TextSettings) -> np.ndarray:
    """Every held-out document, in file order, EOS-terminated, concatenated and cut into samples
    (the trailing partial sample is dropped, as ``prepare`` does)."""
    tokenizer = _tokenizer(settings)
    packer = TokenPacker(settings.sample_length, tokenizer.eos_id)
    texts = _held_out_texts(settings)
    while batch := list(islice(texts, settings.batch_documents)):
        for ids in tokenizer.encode_batch(batch):
            packer.add_document(ids)
    samples, _ = packer.take_all()
    return samples


def _held_out_texts(settings: TextSettings) -> Iterator[str]:
    for source in settings.files:
        for _, record in file_records(settings, source):
            if isinstance(record, BadDocument):
                _bad_document(settings, record)
            elif isinstance(record, Document) and settings.is_held_out(record.text):
                yield record.text


def _fingerprint(settings: TextSettings) -> str:
    """Identifies what decides the stream: file names and content signatures, tokenizer definition,
    packing and split."""
    described = {
        "files": [[source_name(f.path), _signature(settings, f)] for f in settings.files],
        "tokenizer": _tokenizer(settings).sha256,
        "context_length": settings.context_length,
        "text_key": settings.text_key,
        "split": [settings.validation_fraction, settings.split_seed],
        "shuffle_window": settings.shuffle_window,
    }
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()[:16]


def _signature(settings: TextSettings, source: SourceFile) -> str:
    """The file's content signature; with ``skip_bad_files`` an unreadable file is named as such (a resume
    after it became readable again would read other documents, so its fingerprint differs)."""
    try:
        return content_signature(source.path)
    except UNREADABLE_FILE_ERRORS as exc:
        if not settings.skip_bad_files:
            raise SourceError(f"{exc}; {FILE_SKIP_HINT}") from exc
        log.warning("cannot read %s, its documents are left out (data.skip_bad_shards): %s", source.path, exc)
        return "unreadable"
