"""Documents from RefinedWeb-format parquet, JSONL and plain-text files, in a fixed order.

Every preprocessing step reads its corpus through here, so all of them see the
same documents in the same order (the basis of byte-identical output) and fail
the same way on bad input: with the file, the row or line, and what was
expected.  Nothing is skipped silently: a document that cannot be read
(undecodable or invalid text, a null, a broken JSONL line) stops the reader
unless the caller opts into ``bad_documents="skip"``, and then every skipped
document is reported to the caller, which counts it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Iterator, NamedTuple

from .remote import RemoteReadError, glob_remote, is_remote, open_remote, url_name

PARQUET_TEXT_COLUMN = "content"
PARQUET_METADATA_COLUMNS = ("url", "timestamp", "dump", "segment")
JSONL_TEXT_KEY = "text"
_PARQUET_SUFFIXES = (".parquet",)
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
BAD_DOCUMENT_MODES = ("error", "skip")
SKIP_HINT = "to skip and count such documents use --bad-documents skip (data.bad_documents=skip in raw mode)"
FILE_SKIP_HINT = "to leave out and count files that cannot be read use data.skip_bad_shards=true"
SIGNATURE_BLOCK = 1 << 16
log = logging.getLogger(__name__)


class Document(NamedTuple):
    text: str
    metadata: dict[str, Any]


class BadDocument(NamedTuple):
    """A document that cannot be read; ``error`` names the file, the row or line, and the fault."""

    error: str
    metadata: dict[str, Any]


Record = Document | BadDocument


class SourceError(ValueError):
    """Unreadable input; the message names the file and the row or line."""


class UnreadableFile(SourceError):
    """A whole file (or the rest of it) cannot be read: it cannot be opened, is not parquet, or its
    data or the network fails for good; a schema that does not fit is a plain ``SourceError``."""


# What a reader raises when a file cannot be read (on): a remote failure mid-read surfaces as it is.
UNREADABLE_FILE_ERRORS = (UnreadableFile, RemoteReadError)


@dataclass(frozen=True)
class SourceFile:
    path: str
    format: str  # "parquet", "jsonl" or "text"


def expand_inputs(patterns: list[str], file_format: str | None = None) -> list[SourceFile]:
    """Expand paths, globs, directories and URLs into a sorted, duplicate-free list of input files.

    Sorting makes the document order independent of the shell and filesystem.
    A pattern that matches nothing is an error: a typo would otherwise shrink the corpus.
    A file reached under several names (``x`` and ``./x``, a symlink) is read once,
    under the first name in sorted order, and the other names are reported.
    ``@list.txt`` stands for the paths or URLs listed in that file, one a line;
    an ``http(s)://`` URL is taken as it is, other URLs (``hf://...``) are globbed by fsspec.
    """
    files: list[str] = []
    for pattern in _listed(patterns):
        if is_remote(pattern):
            matches = glob_remote(pattern)
        elif os.path.isdir(pattern):
            matches = [p for p in glob.glob(os.path.join(pattern, "**", "*"), recursive=True) if os.path.isfile(p)]
        else:
            matches = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
        if not matches:
            raise FileNotFoundError(f"input {pattern!r} matches no files")
        files.extend(matches)
    names: dict[str, list[str]] = {}
    for path in sorted(set(files)):
        names.setdefault(path if is_remote(path) else os.path.realpath(path), []).append(path)
    for first, *others in (group for group in names.values() if len(group) > 1):
        log.warning("input %s is also named as %s; it is read once", first, ", ".join(others))
    return [SourceFile(p, file_format or detect_format(p)) for p in sorted(group[0] for group in names.values())]


def _listed(patterns: list[str]) -> list[str]:
    """``patterns`` with each ``@file`` replaced by the non-blank lines of that file."""
    out = []
    for pattern in patterns:
        if pattern.startswith("@"):
            with open(pattern[1:], encoding="utf-8") as f:
                out += [line.strip() for line in f if line.strip()]
        else:
            out.append(pattern)
    return out


def open_source(path: str, readahead: int | None = None) -> BinaryIO:
    """A local file or a URL (range requests of at least ``readahead`` bytes, see ``remote``) opened for
    binary reading."""
    return open_remote(path, readahead) if is_remote(path) else open(path, "rb")


def source_name(path: str) -> str:
    """The file name of a path or URL."""
    return url_name(path) if is_remote(path) else os.path.basename(path)


def detect_format(path: str) -> str:
    """Input format from the file name: ``.parquet``, ``.jsonl``/``.ndjson``, anything else is plain text."""
    name = source_name(path).lower()
    if name.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    return "text"


def iter_documents(
    sources: list[SourceFile],
    text_key: str | None = None,
    bad_documents: str = "error",
    on_bad: Callable[[BadDocument], None] | None = None,
    metadata: bool = True,
) -> Iterator[Document]:
    """Yield every readable document of every source in order.

    ``text_key`` names the parquet column or JSONL key holding the text
    (default ``content`` for parquet as in RefinedWeb, ``text`` for JSONL).
    A plain-text file is one document.  A bad document raises ``SourceError``,
    or with ``bad_documents="skip"`` is passed to ``on_bad`` and left out.
    ``metadata=False`` leaves out the parquet metadata columns (never decoded then).
    """
    check_bad_documents_mode(bad_documents)
    for record in iter_records(sources, text_key, metadata):
        if isinstance(record, Document):
            yield record
        elif bad_documents == "error":
            raise SourceError(f"{record.error}; {SKIP_HINT}")
        elif on_bad is not None:
            on_bad(record)


@dataclass
class SkippedDocuments:
    """``on_bad`` callback that counts skipped documents and keeps the first errors for the report."""

    count: int = 0
    examples: list[str] = field(default_factory=list)
    keep: int = 5

    def __call__(self, bad: BadDocument) -> None:
        self.count += 1
        if len(self.examples) < self.keep:
            self.examples.append(bad.error)

    def summary(self) -> str:
        return f"skipped {self.count} bad documents" + (f" (first: {self.examples[0]})" if self.examples else "")


def check_bad_documents_mode(mode: str) -> None:
    if mode not in BAD_DOCUMENT_MODES:
        raise ValueError(f"bad_documents={mode!r}, expected one of {', '.join(BAD_DOCUMENT_MODES)}")


def numbered_records(source: SourceFile, text_key: str | None = None,
                     first_document: int = 0) -> Iterator[tuple[int, Record]]:
    """``(number, record)`` for the documents of one file, numbered from 0 in file order.

    A parquet file is entered at the row group holding ``first_document`` (a
    resume re-reads at most that row group); earlier documents may still come.
    """
    if source.format == "parquet":
        for record in iter_parquet(source.path, text_key or PARQUET_TEXT_COLUMN, metadata=False,
                                   first_row=first_document):
            yield record.metadata["row"], record
    else:
        yield from enumerate(iter_records([source], text_key, metadata=False))


def iter_records(sources: list[SourceFile], text_key: str | None = None, metadata: bool = True) -> Iterator[Record]:
    """Every document of every source in order, an unreadable one as a ``BadDocument`` in its place."""
    for source in sources:
        if source.format == "parquet":
            yield from iter_parquet(source.path, text_key or PARQUET_TEXT_COLUMN, metadata=metadata)
        elif source.format == "jsonl":
            yield from iter_jsonl(source.path, text_key or JSONL_TEXT_KEY)
        elif source.format == "text":
            yield from iter_text(source.path)
        else:
            raise ValueError(f"{source.path}: unknown input format {source.format!r}, expected parquet, jsonl or text")


def iter_parquet(path: str, text_column: str = PARQUET_TEXT_COLUMN, batch_rows: int = 1024,
                 metadata: bool = True, first_row: int = 0) -> Iterator[Record]:
    """RefinedWeb-format parquet: text in ``text_column``; url/timestamp/dump/segment kept as metadata.

    Only the text column must be valid UTF-8: a bad byte in a metadata column
    (which training never reads) is shown as U+FFFD instead of stopping the run.
    Row groups that end before ``first_row`` are not read at all.
    """
    if not is_remote(path):  # pyarrow's native file I/O
        yield from _parquet_records(path, path, text_column, batch_rows, metadata, first_row)
        return
    try:
        f = open_remote(path)
    except OSError as exc:
        raise UnreadableFile(f"{path}: cannot open ({exc})") from exc
    with f:
        yield from _parquet_records(f, path, text_column, batch_rows, metadata, first_row)


def _parquet_records(f: str | BinaryIO, path: str, text_column: str, batch_rows: int, metadata: bool,
                     first_row: int) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except (pa.ArrowException, OSError) as exc:
        raise UnreadableFile(f"{path}: not a readable parquet file ({exc})") from exc
    schema = pf.schema_arrow
    if text_column not in schema.names:
        raise SourceError(
            f"{path}: no column {text_column!r} (columns: {', '.join(schema.names)}); "
            f"expected RefinedWeb-format parquet with the document text in {text_column!r}"
        )
    text_type = schema.field(text_column).type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise SourceError(f"{path}: column {text_column!r} has type {text_type}, expected a string column")
    meta_columns = [c for c in PARQUET_METADATA_COLUMNS if c in schema.names] if metadata else []
    row, group = 0, 0
    while group < pf.num_row_groups and row + pf.metadata.row_group(group).num_rows <= first_row:
        row += pf.metadata.row_group(group).num_rows
        group += 1
    batches = pf.iter_batches(batch_size=batch_rows, row_groups=list(range(group, pf.num_row_groups)),
                              columns=[text_column, *meta_columns])
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as exc:
            raise UnreadableFile(f"{path}: unreadable parquet data after row {row} ({exc})") from exc
        if batch is None:
            break
        texts = _column_values(batch.column(0), lambda raw: raw)
        meta = {c: _column_values(batch.column(i + 1), _replace_undecodable) for i, c in enumerate(meta_columns)}
        for i, text in enumerate(texts):
            where = f"{path}: row {row}: column {text_column!r}"
            info: dict[str, Any] = {"source": path, "row": row, **{c: values[i] for c, values in meta.items()}}
            if text is None:
                yield BadDocument(f"{where} is null, expected a string", info)
            elif isinstance(text, bytes):
                yield BadDocument(_utf8_problem(text, where), info)
            else:
                yield Document(text, info)
            row += 1


def _column_values(column: Any, undecodable: Callable[[bytes], Any]) -> list[Any]:
    """A batch column as Python values; a string that is not valid UTF-8 becomes ``undecodable(raw bytes)``.

    Valid columns take the fast path (one conversion of the whole column); only
    a batch holding a bad value is decoded row by row.
    """
    import pyarrow as pa

    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        binary = pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary()
        values = []
        for raw in column.cast(binary).to_pylist():
            try:
                values.append(None if raw is None else raw.decode("utf-8"))
            except UnicodeDecodeError:
                values.append(undecodable(raw))
        return values


def _replace_undecodable(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def iter_jsonl(path: str, text_key: str = JSONL_TEXT_KEY) -> Iterator[Record]:
    """One JSON object per line with the text under ``text_key``; blank lines are allowed."""
    with open_source(path) as f:
        for line_no, raw in enumerate(f, start=1):
            info = {"source": path, "row": line_no - 1}
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield BadDocument(_utf8_problem(raw, f"{path}: line {line_no}"), info)
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield BadDocument(f"{path}: line {line_no}: invalid JSON ({exc.msg} at column {exc.colno})", info)
                continue
            if not isinstance(obj, dict) or text_key not in obj:
                yield BadDocument(f"{path}: line {line_no}: expected a JSON object with key {text_key!r}", info)
                continue
            text = obj[text_key]
            if not isinstance(text, str):
                yield BadDocument(
                    f"{path}: line {line_no}: key {text_key!r} is {type(text).__name__}, expected a string", info
                )
            elif (problem := _surrogate_problem(text)) is not None:
                yield BadDocument(f"{path}: line {line_no}: key {text_key!r} {problem}", info)
            else:
                yield Document(text, info)


def iter_text(path: str) -> Iterator[Record]:
    """A UTF-8 plain-text file as a single document; an empty file holds no document."""
    with open_source(path) as f:
        raw = f.read()
    if not raw:
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        yield BadDocument(_utf8_problem(raw, f"{path}: line {line}"), {"source": path, "row": 0})
        return
    yield Document(text, {"source": path, "row": 0})


def known_document_count(sources: list[SourceFile]) -> int | None:
    """Number of documents if it can be had without reading the text (for progress bars), else None."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    total = 0
    for source in sources:
        if source.format == "parquet":
            try:
                if is_remote(source.path):
                    with open_remote(source.path) as f:
                        total += pq.ParquetFile(f).metadata.num_rows
                else:
                    total += pq.ParquetFile(source.path).metadata.num_rows
            except (pa.ArrowException, OSError):
                return None  # reported with context when the file is actually read
        elif source.format == "text":
            total += int(source_size(source.path) > 0)
        else:
            return None
    return total


def file_identity(path: str, chunk_bytes: int = 1 << 20) -> dict[str, Any]:
    """Path, size and sha256 of a local input file, as recorded in the manifest's ``sources``; for a URL
    its content signature instead of the sha256 (which would download the whole file once more)."""
    if is_remote(path):
        return {"path": path, "size": source_size(path), "signature": content_signature(path)}
    h, size = hashlib.sha256(), 0
    with open_source(path) as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
            size += len(chunk)
    return {"path": path, "size": size, "sha256": h.hexdigest()}


def source_size(path: str) -> int:
    """Bytes in a local file or behind a URL."""
    with open_source(path) as f:
        return f.seek(0, os.SEEK_END)


def content_signature(path: str, block: int = SIGNATURE_BLOCK) -> str:
    """A cheap fingerprint of a file's content: size, first and last ``block`` bytes and, for
    parquet, the whole footer (row-group sizes, offsets and statistics of every column).

    Reading the whole corpus at every start would cost as much as an epoch of
    I/O; a rewrite of the same size that keeps the head, the tail and (for
    parquet) every page size of the file is not detected.
    """
    h = hashlib.sha256()
    with open_source(path, readahead=block) as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(0)
        h.update(size.to_bytes(8, "little"))
        h.update(f.read(block))
        f.seek(max(0, size - block))
        tail = f.read(block)
        h.update(tail)
        if detect_format(path) == "parquet" and size >= 12 and tail.endswith(b"PAR1"):
            footer = int.from_bytes(tail[-8:-4], "little")
            if footer + 8 > len(tail) and footer + 8 <= size:
                f.seek(size - 8 - footer)
                h.update(f.read(footer))
    return h.hexdigest()[:32]


def _utf8_problem(raw: bytes, where: str) -> str:
    """What is wrong with bytes that fail to decode, for a ``BadDocument`` error."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"{where}, byte {exc.start}: byte {raw[exc.start:exc.start + 1]!r} is not valid UTF-8; expected UTF-8 text"
    raise AssertionError("called for bytes that decode")


def _surrogate_problem(text: str) -> str | None:
    """A lone surrogate (JSON ``"\\ud800"``) is not text any tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (f"holds a lone surrogate U+{ord(text[exc.start]):04X} at character {exc.start}, "
                f"which is not valid Unicode text; expected UTF-8 text")
    return None
