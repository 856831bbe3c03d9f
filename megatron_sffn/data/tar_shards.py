"""Reading one token shard, trusting nothing the manifest does not vouch for.

A shard is read whole (it is small) through webdataset's ``gopen``, so a local
path, ``file://``, ``http(s)://`` or ``pipe:`` command all work, and its tar
stream is walked by ``webdataset.tariterators``.  Every member is checked
against the manifest (key, field, length, token range) and the bytes against
the recorded sha256, because a bad shard that trains silently costs far more
than the microseconds the checks take.  Every failure is a ``ShardError``
naming the shard and, where there is one, the sample.
"""

from __future__ import annotations

import hashlib
import tarfile
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from webdataset.gopen import gopen
from webdataset.tariterators import tar_file_iterator

from .manifest import Manifest, sample_key


class ShardError(ValueError):
    """A shard that is missing, unreadable or disagrees with the manifest."""


@dataclass(frozen=True)
class ShardSpec:
    """What the manifest promises about one shard."""

    url: str
    samples: int
    first_index: int  # index within the split of the shard's first sample
    sha256: str | None  # None skips the content check


@dataclass(frozen=True)
class SampleFormat:
    """How every sample of a dataset is stored."""

    sample_length: int
    dtype: np.dtype
    token_field: str  # tar member suffix, ``tokens.u16`` or ``tokens.u32``
    vocab_size: int

    @classmethod
    def of(cls, manifest: Manifest) -> "SampleFormat":
        return cls(manifest.sample_length, manifest.dtype, manifest.token_field, manifest.tokenizer.vocab_size)


def split_shards(manifest: Manifest, split: str, url_template: str | None = None, verify: bool = True) -> list[ShardSpec]:
    """The manifest's shards of ``split`` as ``ShardSpec`` s, in manifest order.

    ``url_template`` (e.g. ``"pipe:curl -s https://host/data/{path}"``)
    relocates shards: ``{path}`` is replaced by the manifest's shard path.
    """
    specs, first = [], 0
    for shard in manifest.split(split).shards:
        url = url_template.format(path=shard.path) if url_template else manifest.shard_location(shard)
        specs.append(ShardSpec(url, shard.samples, first, shard.sha256 if verify else None))
        first += shard.samples
    return specs


def read_shard(spec: ShardSpec, fmt: SampleFormat) -> np.ndarray:
    """All samples of a shard as a ``(samples, sample_length)`` array in tar order."""
    try:
        stream = gopen(spec.url, "rb")
    except FileNotFoundError as exc:
        raise ShardError(f"{spec.url}: shard is missing (the manifest lists it with {spec.samples} samples)") from exc
    except OSError as exc:
        raise ShardError(f"{spec.url}: cannot open shard ({exc})") from exc
    reader = _HashingReader(stream)
    rows = np.empty((spec.samples, fmt.sample_length), dtype=fmt.dtype)
    count = 0
    try:
        for member in tar_file_iterator(reader):
            _check_member(spec, fmt, count, member["fname"], member["data"])
            rows[count] = np.frombuffer(member["data"], dtype=fmt.dtype)
            count += 1
        reader.read_to_end()
        stream.close()
    except ShardError:
        raise
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        raise ShardError(f"{spec.url}: unreadable tar stream after {count} good samples ({exc})") from exc
    finally:
        _close_quietly(stream)
    if count != spec.samples:
        raise ShardError(f"{spec.url}: holds {count} samples, the manifest says {spec.samples} (truncated shard?)")
    if spec.sha256 is not None and reader.hexdigest() != spec.sha256:
        raise ShardError(f"{spec.url}: sha256 is {reader.hexdigest()}, the manifest says {spec.sha256} (corrupt shard)")
    _check_token_range(spec, fmt, rows)
    return rows


def _check_member(spec: ShardSpec, fmt: SampleFormat, count: int, name: str, data: bytes) -> None:
    if count >= spec.samples:
        raise ShardError(f"{spec.url}: member {name!r} is beyond the {spec.samples} samples the manifest lists")
    key = sample_key(spec.first_index + count)
    expected = f"{key}.{fmt.token_field}"
    if name != expected:
        raise ShardError(f"{spec.url}: sample {count} is member {name!r}, expected {expected!r}")
    tokens, partial = divmod(len(data), fmt.dtype.itemsize)
    if partial or tokens != fmt.sample_length:
        raise ShardError(
            f"{spec.url}: sample {key} has {len(data)} bytes ({tokens} tokens), "
            f"expected {fmt.sample_length} {fmt.dtype.name} tokens"
        )


def _check_token_range(spec: ShardSpec, fmt: SampleFormat, rows: np.ndarray) -> None:
    bad = np.flatnonzero(rows.max(axis=1) >= fmt.vocab_size)
    if len(bad):
        row = int(bad[0])
        raise ShardError(
            f"{spec.url}: sample {sample_key(spec.first_index + row)} holds token id {int(rows[row].max())}, "
            f"expected ids below the tokenizer's vocab_size={fmt.vocab_size}"
        )


class _HashingReader:
    """A read-only stream wrapper that hashes every byte read through it."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._hash = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._hash.update(data)
        return data

    def read_to_end(self) -> None:
        """Consume the tar's trailing padding so the hash covers the whole file."""
        while self.read(1 << 20):
            pass

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _close_quietly(stream: BinaryIO) -> None:
    try:
        stream.close()
    except OSError:
        pass
