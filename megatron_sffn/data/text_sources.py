"""Documents from RefinedWeb-format parquet, JSONL and plain-text files, in a fixed order.

Every preprocessing step reads its corpus through here, so all of them see the
same documents in the same order (the basis of byte-identical output) and fail
the same way on bad input: with the file, the row or line, and what was
expected.  Nothing is skipped silently.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple

PARQUET_TEXT_COLUMN = "content"
PARQUET_METADATA_COLUMNS = ("url", "timestamp", "dump", "segment")
JSONL_TEXT_KEY = "text"
_PARQUET_SUFFIXES = (".parquet",)
_JSONL_SUFFIXES = (".jsonl", ".ndjson")


class Document(NamedTuple):
    text: str
    metadata: dict[str, Any]


class SourceError(ValueError):
    """Unreadable input; the message names the file and the row or line."""


@dataclass(frozen=True)
class SourceFile:
    path: str
    format: str  # "parquet", "jsonl" or "text"


def expand_inputs(patterns: list[str], file_format: str | None = None) -> list[SourceFile]:
    """Expand paths, globs and directories into a sorted, duplicate-free list of input files.

    Sorting makes the document order independent of the shell and filesystem.
    A pattern that matches nothing is an error: a typo would otherwise shrink the corpus.
    """
    files: list[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            matches = [p for p in glob.glob(os.path.join(pattern, "**", "*"), recursive=True) if os.path.isfile(p)]
        else:
            matches = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
        if not matches:
            raise FileNotFoundError(f"input {pattern!r} matches no files")
        files.extend(matches)
    return [SourceFile(p, file_format or detect_format(p)) for p in sorted(set(files))]


def detect_format(path: str) -> str:
    """Input format from the file name: ``.parquet``, ``.jsonl``/``.ndjson``, anything else is plain text."""
    name = path.lower()
    if name.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    return "text"


def iter_documents(sources: list[SourceFile], text_key: str | None = None) -> Iterator[Document]:
    """Yield every document of every source in order.

    ``text_key`` names the parquet column or JSONL key holding the text
    (default ``content`` for parquet as in RefinedWeb, ``text`` for JSONL).
    A plain-text file is one document.
    """
    for source in sources:
        if source.format == "parquet":
            yield from iter_parquet(source.path, text_key or PARQUET_TEXT_COLUMN)
        elif source.format == "jsonl":
            yield from iter_jsonl(source.path, text_key or JSONL_TEXT_KEY)
        elif source.format == "text":
            yield from iter_text(source.path)
        else:
            raise ValueError(f"{source.path}: unknown input format {source.format!r}, expected parquet, jsonl or text")


def iter_parquet(path: str, text_column: str = PARQUET_TEXT_COLUMN, batch_rows: int = 1024) -> Iterator[Document]:
    """RefinedWeb-format parquet: text in ``text_column``; url/timestamp/dump/segment kept as metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise SourceError(f"{path}: not a readable parquet file ({exc})") from exc
    schema = pf.schema_arrow
    if text_column not in schema.names:
        raise SourceError(
            f"{path}: no column {text_column!r} (columns: {', '.join(schema.names)}); "
            f"expected RefinedWeb-format parquet with the document text in {text_column!r}"
        )
    text_type = schema.field(text_column).type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise SourceError(f"{path}: column {text_column!r} has type {text_type}, expected a string column")
    meta_columns = [c for c in PARQUET_METADATA_COLUMNS if c in schema.names]
    row = 0
    batches = pf.iter_batches(batch_size=batch_rows, columns=[text_column, *meta_columns])
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as exc:
            raise SourceError(f"{path}: unreadable parquet data after row {row} ({exc})") from exc
        if batch is None:
            break
        columns = batch.to_pydict()
        for i, text in enumerate(columns[text_column]):
            if text is None:
                raise SourceError(f"{path}: row {row}: column {text_column!r} is null, expected a string")
            metadata: dict[str, Any] = {"source": path, "row": row}
            for c in meta_columns:
                metadata[c] = columns[c][i]
            yield Document(text, metadata)
            row += 1


def iter_jsonl(path: str, text_key: str = JSONL_TEXT_KEY) -> Iterator[Document]:
    """One JSON object per line with the text under ``text_key``; blank lines are allowed."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            line = _decode_utf8(raw, path, f"line {line_no}")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SourceError(f"{path}: line {line_no}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
            if not isinstance(obj, dict) or text_key not in obj:
                raise SourceError(f"{path}: line {line_no}: expected a JSON object with key {text_key!r}")
            text = obj[text_key]
            if not isinstance(text, str):
                raise SourceError(f"{path}: line {line_no}: key {text_key!r} is {type(text).__name__}, expected a string")
            yield Document(text, {"source": path, "row": line_no - 1})


def iter_text(path: str) -> Iterator[Document]:
    """A UTF-8 plain-text file as a single document; an empty file holds no document."""
    raw = Path(path).read_bytes()
    if raw:
        yield Document(_decode_utf8(raw, path, "file"), {"source": path, "row": 0})


def known_document_count(sources: list[SourceFile]) -> int | None:
    """Number of documents if it can be had without reading the text (for progress bars), else None."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    total = 0
    for source in sources:
        if source.format == "parquet":
            try:
                total += pq.ParquetFile(source.path).metadata.num_rows
            except (pa.ArrowException, OSError):
                return None  # reported with context when the file is actually read
        elif source.format == "text":
            total += int(os.path.getsize(source.path) > 0)
        else:
            return None
    return total


def file_identity(path: str, chunk_bytes: int = 1 << 20) -> dict[str, Any]:
    """Path, size and sha256 of an input file, as recorded in the manifest's ``sources``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return {"path": path, "size": os.path.getsize(path), "sha256": h.hexdigest()}


def _decode_utf8(raw: bytes, path: str, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        position = f"line {line}, byte {exc.start}" if where == "file" else f"{where}, byte {exc.start}"
        raise SourceError(
            f"{path}: {position}: byte {raw[exc.start:exc.start + 1]!r} is not valid UTF-8; expected UTF-8 text"
        ) from exc
