"""Sequence packing and the train/validation split.

Packing follows GPT-style pretraining as used in "Building on Efficient
Foundations: Effectively Training LLMs with Structured Feedforward Layers":
every document ends with EOS, documents are concatenated into one stream, and
the stream is cut into samples of ``context_length + 1`` tokens (inputs plus
the shifted targets), so no token is spent on padding.  Only the final partial
sample of a split is discarded, and its size is reported.

The split is decided per document from a hash of its text, never from its
position, so it is the same however the corpus is ordered, sharded or
parallelised, and the same document can never land in both splits.

``PackingSettings`` declares (and checks) these settings once for both ways
of reading a corpus: ``data_tools.prepare`` and the on-the-fly loader give
the same samples for the same settings.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .text_sources import check_bad_documents_mode


@dataclass(frozen=True, kw_only=True)
class PackingSettings:
    """What decides how documents become samples and which of them are held out."""

    tokenizer: str  # tokenizer.json path or tiktoken encoding name
    context_length: int = 2048
    validation_fraction: float = 0.005
    split_seed: int = 0  # seed of the document-hash split
    text_key: str | None = None
    eos_token: str | None = None
    bad_documents: str = "error"  # or "skip": leave unreadable documents out, counted

    def __post_init__(self) -> None:
        if self.context_length < 1:
            raise ValueError(f"{self.setting_name('context_length')} is {self.context_length}, "
                             f"expected a positive integer")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"{self.setting_name('validation_fraction')} is {self.validation_fraction}, "
                             f"expected a number in [0, 1)")
        check_bad_documents_mode(self.bad_documents)

    @classmethod
    def setting_name(cls, field: str) -> str:
        """How error messages name a setting (a command-line tool names its option instead)."""
        return field

    @property
    def sample_length(self) -> int:
        return self.context_length + 1

    def is_held_out(self, text: str) -> bool:
        return self.validation_fraction > 0 and is_validation(text, self.validation_fraction, self.split_seed)


def is_validation(text: str, fraction: float, seed: int) -> bool:
    """Whether a document belongs to the validation split.

    The first 8 bytes of ``sha256(seed, text)`` map to a uniform number in
    [0, 1); documents below ``fraction`` are validation.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"validation fraction is {fraction}, expected a number in [0, 1]")
    digest = hashlib.sha256(struct.pack("<q", seed) + text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") < fraction * 2.0**64


class TokenPacker:
    """Concatenates EOS-terminated documents and hands out whole samples.

    ``pending`` tokens (not yet part of an emitted sample) can be saved and
    passed back as ``initial`` to resume packing exactly where it stopped.
    """

    def __init__(self, sample_length: int, eos_id: int, initial: np.ndarray | None = None) -> None:
        if sample_length < 2:
            raise ValueError(f"sample_length is {sample_length}, expected at least 2 (context_length >= 1)")
        self.sample_length = sample_length
        self.eos_id = eos_id
        self._chunks: list[np.ndarray] = []
        self._size = 0
        if initial is not None and len(initial):
            self._append(np.asarray(initial, dtype=np.int64))

    @property
    def pending_tokens(self) -> int:
        return self._size

    def add_document(self, ids: Sequence[int] | np.ndarray) -> None:
        """Append a document's token ids followed by EOS."""
        self._append(np.append(np.asarray(ids, dtype=np.int64), self.eos_id))

    def pending(self) -> np.ndarray:
        """All tokens not yet taken, as one array (used to checkpoint)."""
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.int64)

    def take(self, samples: int) -> np.ndarray | None:
        """Remove and return the next ``samples`` samples as a ``(samples, sample_length)`` array,
        or ``None`` while fewer tokens than that are pending."""
        need = samples * self.sample_length
        if self._size < need:
            return None
        stream = self.pending()
        self._chunks = [stream[need:]] if len(stream) > need else []
        self._size = len(stream) - need
        return stream[:need].reshape(samples, self.sample_length)

    def take_all(self) -> tuple[np.ndarray, int]:
        """Every whole sample still pending, plus the number of trailing tokens that do not fill one."""
        whole = self._size // self.sample_length
        samples = self.take(whole)
        assert samples is not None
        return samples, self._size

    def _append(self, arr: np.ndarray) -> None:
        self._chunks.append(arr)
        self._size += len(arr)

