"""Validation loss and perplexity on the held-out split.

Perplexity is ``exp`` of the mean token cross-entropy over *all* evaluated
tokens (a global token mean, not a mean of per-batch perplexities), which is
what makes the number independent of the batch size and of the parallel
layout: with a full pass every validation sample is evaluated exactly once
whatever the data-parallel size, and padding rows carry ``loss_mask`` 0.
``max_batches`` limits each data-parallel rank to its first micro-batches;
that subset depends on the data-parallel size, so figures meant for
comparison across layouts use the full pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from typing import Any, Iterable, Iterator

import torch

from .metrics import perplexity
from .step import make_forward_step, reduce_step_numbers, run_schedule, to_device


@dataclass(frozen=True)
class EvalResult:
    loss: float
    perplexity: float
    tokens: int


def _groups(batches: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    while group := [to_device(batch) for batch in islice(batches, size)]:
        yield group


def evaluate(
    model: list,
    batches: Iterable[dict[str, Any]],
    *,
    seq_length: int,
    micro_batch_size: int,
    micro_batches_per_call: int,
    max_batches: int | None = None,
) -> EvalResult:
    """Forward-only pass over ``batches`` (this rank's validation micro-batches).  Collective."""
    forward_step = make_forward_step()
    loss_sum, count = 0.0, 0.0
    for chunk in model:
        chunk.eval()
    try:
        with torch.no_grad():
            for group in _groups(islice(iter(batches), max_batches), micro_batches_per_call):
                local = run_schedule(
                    model,
                    group,
                    forward_step,
                    seq_length=seq_length,
                    micro_batch_size=micro_batch_size,
                    forward_only=True,
                )
                if local is not None:
                    loss_sum, count = loss_sum + local[0], count + local[1]
    finally:
        for chunk in model:
            chunk.train()
    total_sum, total_count = reduce_step_numbers((loss_sum, count), [])
    if total_count == 0:
        raise ValueError("the validation pass evaluated no tokens (is the validation split empty?)")
    loss = total_sum / total_count
    return EvalResult(loss=loss, perplexity=perplexity(loss), tokens=int(total_count))
