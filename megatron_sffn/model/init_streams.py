"""Layout-independent initialisation: each part of the model draws from its own RNG stream.

With CPU initialisation every rank draws full weights from the CPU generator
and keeps its slice, which makes tensor parallelism seed-exact.  Pipeline
parallelism breaks that if draws are sequential: stage 1 would start drawing
layer 2 from the state where layer 0 started on stage 0.  So the embedding
and every decoder layer draw inside a generator forked and seeded from
``(seed, stream)``; the untied output layer then draws from the untouched
base state on whichever stage holds it.  A given seed therefore builds the
same model at any TP x PP layout, and a run can restart at another layout.
The seed is the one given to :func:`seed_model_parallel` (``torch.initial_seed()``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

EMBEDDING_STREAM = 0


def layer_stream(layer: int) -> int:
    """Stream of decoder layer ``layer`` (0-based)."""
    return 1 + layer


def _stream_seed(stream: int) -> int:
    return (torch.initial_seed() * 1_000_003 + stream) % (2**63 - 1)


@contextlib.contextmanager
def init_stream(stream: int) -> Iterator[None]:
    """Run the enclosed draws on the CPU generator seeded for ``stream``, then restore the base state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_stream_seed(stream))
        yield


class NormalInStream:
    """``init_method`` drawing N(0, std²) from its own stream (used for the word embeddings)."""

    def __init__(self, std: float, stream: int) -> None:
        self.std = std
        self.stream = stream

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        with init_stream(self.stream):
            return torch.nn.init.normal_(weight, mean=0.0, std=self.std)
