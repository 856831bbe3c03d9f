"""The dataset manifest: the one file that says a preprocessed dataset is complete.

``prepare`` writes ``manifest.json`` last, atomically, so its presence is the
commit point of a dataset; loaders read nothing that it does not list.  Loading
validates every key up front because a malformed manifest found mid-training
costs a job, while one found at start-up costs a second.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic_io import write_text_atomic  # noqa: F401  (re-exported for data_tools)

FORMAT = "megatron-sffn/shards-v1"
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "validation")
TOKEN_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
TOKEN_FIELDS = {"uint16": "tokens.u16", "uint32": "tokens.u32"}
TOKENIZER_TYPES = ("hf-json", "tiktoken")


class ManifestError(ValueError):
    """A manifest that cannot be trusted; the message names the file and key."""


def token_dtype_for_vocab(vocab_size: int) -> str:
    """Narrowest dtype name the contract allows for ids below ``vocab_size``."""
    return "uint32" if vocab_size > 65535 else "uint16"


def sample_key(index_within_split: int) -> str:
    """Tar member key of a sample: its index within the split, zero-padded."""
    return f"{index_within_split:010d}"


@dataclass(frozen=True)
class TokenizerInfo:
    spec: str
    type: str
    vocab_size: int
    eos_id: int
    sha256: str


@dataclass(frozen=True)
class ShardInfo:
    path: str
    samples: int
    tokens: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    samples: int
    tokens: int
    shards: list[ShardInfo]


@dataclass(frozen=True)
class SourceInfo:
    """An input file of the dataset: a local file by the sha256 of its bytes; a URL by its content
    signature (``text_sources.content_signature``: size, first and last 64 KiB, parquet footer), so
    that ``prepare`` downloads a remote file once, to tokenize it, and not a second time to hash it."""

    path: str
    size: int
    sha256: str | None = None
    signature: str | None = None


@dataclass(frozen=True)
class Manifest:
    context_length: int
    samples_per_shard: int
    tokenizer: TokenizerInfo
    splits: dict[str, SplitInfo]
    sources: list[SourceInfo]
    settings: dict[str, Any]
    created_by: str
    token_dtype: str = ""
    statistics: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    # Where the manifest was read from; shard paths are relative to its directory.
    location: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.token_dtype:
            object.__setattr__(self, "token_dtype", token_dtype_for_vocab(self.tokenizer.vocab_size))

    @property
    def sample_length(self) -> int:
        return self.context_length + 1

    @property
    def dtype(self) -> np.dtype:
        """Little-endian numpy dtype of the stored token ids."""
        return TOKEN_DTYPES[self.token_dtype]

    @property
    def token_field(self) -> str:
        """Tar member suffix holding a sample's tokens (``tokens.u16``/``tokens.u32``)."""
        return TOKEN_FIELDS[self.token_dtype]

    @property
    def root(self) -> Path:
        """Directory that relative shard paths are resolved against."""
        return self.location.parent if self.location is not None else Path(".")

    def shard_location(self, shard: ShardInfo) -> str:
        """Local path or URL of a shard, as a string usable by ``open``/webdataset."""
        if "://" in shard.path:
            return shard.path
        return str(self.root / shard.path)

    def shard_locations(self, split: str) -> list[str]:
        return [self.shard_location(s) for s in self.split(split).shards]

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise KeyError(f"{self._where()}: no split {name!r}; the manifest has {sorted(self.splits)}")
        return self.splits[name]

    def check_tokenizer(self, identity: dict[str, Any]) -> None:
        """Refuse a tokenizer whose definition differs from the one the shards were made with.

        Token ids are meaningless under another vocabulary, and a mismatch shows
        no error at train time, only a model that learns garbage.
        """
        mine = self.tokenizer
        for key in ("sha256", "vocab_size", "eos_id"):
            if identity.get(key) != getattr(mine, key):
                raise ManifestError(
                    f"{self._where()}: tokenizer {identity.get('spec')!r} does not match the manifest's "
                    f"tokenizer {mine.spec!r}: tokenizer.{key} is {identity.get(key)!r}, expected {getattr(mine, key)!r}"
                )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("location")
        out["sources"] = [{k: v for k, v in source.items() if v is not None} for source in out["sources"]]
        out["sample_length"] = self.sample_length
        return out

    def _where(self) -> str:
        return str(self.location) if self.location is not None else "manifest"


def write_manifest_atomic(manifest: Manifest, path: str | os.PathLike[str]) -> Path:
    """Write ``manifest`` to ``path`` (a file or dataset directory) via a temp file and rename.

    Readers treat the manifest's existence as "dataset complete", so it must
    never be observable half-written.  Keys are sorted so equal datasets give
    byte-identical manifests.
    """
    target = _manifest_path(path)
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n"
    write_text_atomic(target, text)
    return target


def load_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read and validate a manifest (``path`` is the file or its dataset directory)."""
    file = _manifest_path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no manifest; a dataset is complete only once prepare has written it")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{file}: not valid UTF-8 JSON ({exc})") from exc
    return manifest_from_dict(raw, file)


def manifest_from_dict(raw: Any, file: Path | None = None) -> Manifest:
    """Build a validated ``Manifest``; errors name ``file`` and the dotted key at fault."""
    check = _Checker(str(file) if file is not None else "manifest")
    obj = check.mapping(raw, "")
    fmt = check.value(obj, "format", str)
    if fmt != FORMAT:
        check.fail("format", f"is {fmt!r}, expected {FORMAT!r}")
    context = check.positive(obj, "context_length")
    sample_length = check.positive(obj, "sample_length")
    if sample_length != context + 1:
        check.fail("sample_length", f"is {sample_length}, expected context_length + 1 = {context + 1}")
    per_shard = check.positive(obj, "samples_per_shard")

    tok = check.mapping(check.value(obj, "tokenizer", dict), "tokenizer")
    tokenizer = TokenizerInfo(
        spec=check.value(tok, "spec", str, "tokenizer."),
        type=check.value(tok, "type", str, "tokenizer."),
        vocab_size=check.positive(tok, "vocab_size", "tokenizer."),
        eos_id=check.value(tok, "eos_id", int, "tokenizer."),
        sha256=check.value(tok, "sha256", str, "tokenizer."),
    )
    if tokenizer.type not in TOKENIZER_TYPES:
        check.fail("tokenizer.type", f"is {tokenizer.type!r}, expected one of {TOKENIZER_TYPES}")
    if not 0 <= tokenizer.eos_id < tokenizer.vocab_size:
        check.fail("tokenizer.eos_id", f"is {tokenizer.eos_id}, expected 0 <= eos_id < vocab_size={tokenizer.vocab_size}")

    dtype = check.value(obj, "token_dtype", str)
    if dtype not in TOKEN_DTYPES:
        check.fail("token_dtype", f"is {dtype!r}, expected one of {sorted(TOKEN_DTYPES)}")
    if dtype == "uint16" and tokenizer.vocab_size > 65535:
        check.fail("token_dtype", f"is uint16 but tokenizer.vocab_size={tokenizer.vocab_size} needs uint32")

    splits_raw = check.mapping(check.value(obj, "splits", dict), "splits")
    splits = {}
    for name in SPLITS:
        if name not in splits_raw:
            check.fail(f"splits.{name}", "is missing")
        splits[name] = _split_from_dict(check, splits_raw[name], f"splits.{name}", sample_length, per_shard)
    for name in splits_raw:
        if name not in SPLITS:
            check.fail(f"splits.{name}", f"is an unknown split, expected only {SPLITS}")

    sources = []
    for i, src in enumerate(check.value(obj, "sources", list)):
        src = check.mapping(src, f"sources[{i}]")
        prefix = f"sources[{i}]."
        identity = {key: check.value(src, key, str, prefix) for key in ("sha256", "signature") if key in src}
        if len(identity) != 1:
            check.fail(f"sources[{i}]", "must have exactly one of sha256 (a local file) or signature (a URL)")
        path, size = check.value(src, "path", str, prefix), check.value(src, "size", int, prefix)
        sources.append(SourceInfo(path=path, size=size, **identity))
    return Manifest(
        format=fmt,
        context_length=context,
        token_dtype=dtype,
        samples_per_shard=per_shard,
        tokenizer=tokenizer,
        splits=splits,
        sources=sources,
        settings=check.value(obj, "settings", dict),
        created_by=check.value(obj, "created_by", str),
        statistics=obj.get("statistics", {}),
        location=file,
    )


def _split_from_dict(check: "_Checker", raw: Any, key: str, sample_length: int, per_shard: int) -> SplitInfo:
    obj = check.mapping(raw, key)
    samples = check.value(obj, "samples", int, key + ".")
    tokens = check.value(obj, "tokens", int, key + ".")
    shards = []
    for i, s in enumerate(check.value(obj, "shards", list, key + ".")):
        where = f"{key}.shards[{i}]"
        s = check.mapping(s, where)
        shard = ShardInfo(
            path=check.value(s, "path", str, where + "."),
            samples=check.positive(s, "samples", where + "."),
            tokens=check.value(s, "tokens", int, where + "."),
            sha256=check.value(s, "sha256", str, where + "."),
        )
        if shard.tokens != shard.samples * sample_length:
            check.fail(f"{where}.tokens", f"is {shard.tokens}, expected samples * sample_length = {shard.samples * sample_length}")
        is_last = i == len(obj["shards"]) - 1
        if shard.samples > per_shard or (not is_last and shard.samples != per_shard):
            expected = f"at most {per_shard}" if is_last else f"exactly samples_per_shard={per_shard} (only the last shard may hold fewer)"
            check.fail(f"{where}.samples", f"is {shard.samples}, expected {expected}")
        shards.append(shard)
    if samples != sum(s.samples for s in shards):
        check.fail(f"{key}.samples", f"is {samples}, expected the sum over its shards = {sum(s.samples for s in shards)}")
    if tokens != samples * sample_length:
        check.fail(f"{key}.tokens", f"is {tokens}, expected samples * sample_length = {samples * sample_length}")
    return SplitInfo(samples=samples, tokens=tokens, shards=shards)


class _Checker:
    """Typed key access that raises ``ManifestError`` naming the file and the dotted key."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, key: str, problem: str) -> None:
        raise ManifestError(f"{self.where}: key {key!r} {problem}")

    def mapping(self, raw: Any, key: str) -> dict[str, Any]:
        if not isinstance(raw, dict):
            self.fail(key or "<top level>", f"is a {type(raw).__name__}, expected a JSON object")
        return raw

    def value(self, obj: dict[str, Any], name: str, kind: type, prefix: str = "") -> Any:
        if name not in obj:
            self.fail(prefix + name, "is missing")
        val = obj[name]
        # bool is an int subclass in Python but never a valid count or id here.
        if not isinstance(val, kind) or (kind is int and isinstance(val, bool)):
            self.fail(prefix + name, f"is {val!r}, expected a JSON {kind.__name__}")
        return val

    def positive(self, obj: dict[str, Any], name: str, prefix: str = "") -> int:
        val = self.value(obj, name, int, prefix)
        if val <= 0:
            self.fail(prefix + name, f"is {val}, expected a positive integer")
        return val


def _manifest_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p if p.suffix == ".json" else p / MANIFEST_NAME
