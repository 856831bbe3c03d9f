"""Parallel tokenization that returns results in input order.

Worker processes only tokenize and decide each document's split; the parent
keeps the single ordered stream, which is why the output does not depend on
the number of workers.  At most a few batches per worker are in flight, so
memory stays bounded however large the corpus is.
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import os
from typing import Iterable, Iterator

import numpy as np

from megatron_sffn.data.packing import is_validation
from megatron_sffn.data.tokenizer import Tokenizer, load_tokenizer

# One encoded document: (belongs to validation, token ids without EOS).
Encoded = tuple[bool, np.ndarray]

_worker: "_BatchEncoder | None" = None


class _BatchEncoder:
    def __init__(self, tokenizer: Tokenizer, validation_fraction: float, seed: int) -> None:
        self.tokenizer = tokenizer
        self.fraction = validation_fraction
        self.seed = seed

    def __call__(self, texts: list[str]) -> list[Encoded]:
        ids = self.tokenizer.encode_batch(texts)
        return [
            (is_validation(text, self.fraction, self.seed), np.asarray(doc, dtype=np.uint32))
            for text, doc in zip(texts, ids)
        ]


def _init_worker(spec: str, eos_token: str | None, validation_fraction: float, seed: int) -> None:
    global _worker
    single_threaded_tokenizers()
    _worker = _BatchEncoder(load_tokenizer(spec, eos_token), validation_fraction, seed)


def _encode_in_worker(texts: list[str]) -> list[Encoded]:
    assert _worker is not None, "worker initializer did not run"
    return _worker(texts)


def single_threaded_tokenizers() -> None:
    """Keep HF tokenizers in this process from running its own thread pool.

    Parallelism then comes only from ``--workers`` processes, so the option means
    what it says and worker processes do not oversubscribe the cores.
    """
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def encode_batches(
    batches: Iterable[list[str]],
    tokenizer: Tokenizer,
    eos_token: str | None,
    validation_fraction: float,
    seed: int,
    workers: int,
    in_flight_per_worker: int = 4,
) -> Iterator[list[Encoded]]:
    """Tokenize ``batches`` with ``workers`` processes (1: in this process), yielding in input order."""
    if workers < 1:
        raise ValueError(f"workers is {workers}, expected at least 1")
    if workers == 1:
        encode = _BatchEncoder(tokenizer, validation_fraction, seed)
        yield from (encode(batch) for batch in batches)
        return
    # spawn, not fork: a forked copy of a tokenizer that already used threads can deadlock.
    ctx = mp.get_context("spawn")
    init = (tokenizer.spec, eos_token, validation_fraction, seed)
    with ctx.Pool(workers, initializer=_init_worker, initargs=init) as pool:
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_in_worker, (batch,)))
            if len(pending) >= workers * in_flight_per_worker:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
