"""One tokenizer interface over HF ``tokenizer.json`` files and tiktoken encodings.

Preprocessing, verification and decoding must agree on a tokenizer exactly, so
every tokenizer carries an ``identity()`` (type, vocabulary size, EOS id and a
hash of its definition) that the manifest records and later checks against.
Nothing here downloads: tiktoken encodings load only from their local cache.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
from pathlib import Path
from typing import Any, Iterator, Protocol

# Checked in this order; the first one present in the vocabulary is the document separator.
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")


class Tokenizer(Protocol):
    spec: str
    type: str
    eos_id: int
    vocab_size: int
    sha256: str

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: Any) -> str: ...

    def identity(self) -> dict[str, Any]: ...


class TokenizerUnavailableError(RuntimeError):
    """The tokenizer exists by name but its files are not on this machine."""


class HFJsonTokenizer:
    """A ``tokenizers`` ``tokenizer.json`` (GPT-2, LLaMA, or one made by ``data_tools.train_tokenizer``)."""

    type = "hf-json"

    def __init__(self, path: Path, spec: str, eos_token: str | None = None) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.spec = spec
        self.path = path
        definition = path.read_bytes()
        try:
            self._tok = HFTokenizer.from_str(definition.decode("utf-8"))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{path}: not a valid HF tokenizer.json ({exc})") from exc
        # Text that happens to contain "<|endoftext|>" must not inject separators:
        # only the packer decides where documents end.
        self._tok.encode_special_tokens = True
        self._sha256 = hashlib.sha256(definition).hexdigest()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = _find_eos(self._tok.token_to_id, eos_token, str(path))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # add_special_tokens=False: LLaMA-style post-processors would prepend BOS
        # to every document, which packing does not want.
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Any) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def identity(self) -> dict[str, Any]:
        return _identity(self)

    @property
    def sha256(self) -> str:
        return self._sha256


class TiktokenTokenizer:
    """A named tiktoken encoding (``gpt2``, ``cl100k_base``, ...) read from the local cache."""

    type = "tiktoken"

    def __init__(self, name: str, eos_token: str | None = None) -> None:
        import tiktoken

        self.spec = name
        with _no_downloads(name):
            self._enc = tiktoken.get_encoding(name)
        self.vocab_size = self._enc.n_vocab
        self.eos_id = _find_eos(self._enc._special_tokens.get, eos_token, f"tiktoken encoding {name!r}")
        self._sha256 = _tiktoken_hash(self._enc)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_ordinary treats special-token text as plain text (see HFJsonTokenizer).
        return self._enc.encode_ordinary_batch(texts, num_threads=1)

    def decode(self, ids: Any) -> str:
        return self._enc.decode([int(i) for i in ids])

    def identity(self) -> dict[str, Any]:
        return _identity(self)

    @property
    def sha256(self) -> str:
        return self._sha256


def load_tokenizer(spec: str | os.PathLike[str], eos_token: str | None = None) -> Tokenizer:
    """Load ``spec``: a ``tokenizer.json`` file, a directory holding one, or a tiktoken encoding name.

    ``eos_token`` overrides the automatic choice of document separator.
    """
    spec_str = str(spec)
    path = Path(spec_str)
    if path.is_dir():
        path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{spec_str}: directory has no tokenizer.json")
    if path.is_file():
        return HFJsonTokenizer(path, spec_str, eos_token)
    if path.suffix == ".json" or os.sep in spec_str:
        where = "" if path.is_absolute() else f" (a relative path, read from the current directory {Path.cwd()})"
        raise FileNotFoundError(f"tokenizer file {spec_str} does not exist{where}")

    import tiktoken

    names = tiktoken.list_encoding_names()
    if spec_str not in names:
        raise ValueError(
            f"tokenizer {spec_str!r} is neither an existing tokenizer.json path nor a tiktoken encoding "
            f"(known encodings: {', '.join(names)})"
        )
    return TiktokenTokenizer(spec_str, eos_token)


def _identity(tok: Tokenizer) -> dict[str, Any]:
    return {"spec": tok.spec, "type": tok.type, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "sha256": tok.sha256}


def _find_eos(lookup: Any, eos_token: str | None, where: str) -> int:
    candidates = (eos_token,) if eos_token else EOS_CANDIDATES
    for token in candidates:
        token_id = lookup(token)
        if token_id is not None:
            return int(token_id)
    raise ValueError(f"{where}: no end-of-text token; looked for {', '.join(candidates)}")


def _tiktoken_hash(enc: Any) -> str:
    """Hash of what defines a tiktoken encoding: split regex, ranked merges, special tokens."""
    h = hashlib.sha256()
    h.update(enc._pat_str.encode("utf-8"))
    for token, rank in sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1]):
        h.update(b"\n%s %d" % (base64.b64encode(token), rank))
    for token, rank in sorted(enc._special_tokens.items(), key=lambda kv: kv[1]):
        h.update(b"\n%s %d" % (token.encode("utf-8"), rank))
    return h.hexdigest()


@contextlib.contextmanager
def _no_downloads(name: str) -> Iterator[None]:
    """Make tiktoken fail instead of fetching an encoding that is not in its local cache."""
    import tiktoken.load

    fetch = tiktoken.load.read_file

    def local_only(blobpath: str) -> bytes:
        if "://" in blobpath:
            cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or "<tmp>/data-gym-cache"
            raise TokenizerUnavailableError(
                f"tiktoken encoding {name!r} is not in the local cache ({cache}) and this project never downloads "
                f"tokenizers at run time; copy the cached files there (set TIKTOKEN_CACHE_DIR) or pass a tokenizer.json path"
            )
        return fetch(blobpath)

    tiktoken.load.read_file = local_only
    try:
        yield
    finally:
        tiktoken.load.read_file = fetch
