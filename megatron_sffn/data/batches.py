"""Turning ``context_length + 1``-token samples into megatron's batch dictionary.

megatron's GPT step reads ``tokens``, ``labels``, ``loss_mask``,
``attention_mask`` and ``position_ids``.  Samples are packed documents, so the
mask is causal (``attention_mask`` is None: attention kernels build it) and
positions run 0..s-1 across document boundaries, as in megatron's default
(``reset_position_ids=False``).  ``loss_mask`` is 1 everywhere except on rows
that stand in for a missing sample (a skipped bad shard, or the padding of the
last validation batch): those rows are all zeros with ``loss_mask`` 0, so they
keep every rank's batch shape without contributing to the loss.  Use per-token
loss normalisation (sum of masked losses / number of unmasked tokens), so a
fully masked micro-batch adds nothing rather than a division by zero.
"""

from __future__ import annotations

from typing import Any

import torch


def make_batch(samples: torch.Tensor, valid: torch.Tensor) -> dict[str, Any]:
    """Build the batch from ``samples`` (integer ``[b, s+1]``) and ``valid`` (bool ``[b]``)."""
    if samples.dim() != 2 or samples.shape[1] < 2:
        raise ValueError(f"samples have shape {tuple(samples.shape)}, expected [batch, context_length + 1]")
    if valid.shape != samples.shape[:1]:
        raise ValueError(f"valid has shape {tuple(valid.shape)}, expected [{samples.shape[0]}]")
    samples = samples.to(torch.int64)
    batch, seq = samples.shape[0], samples.shape[1] - 1
    loss_mask = valid.to(torch.float32)[:, None].expand(batch, seq).contiguous()
    return {
        "tokens": samples[:, :-1].contiguous(),
        "labels": samples[:, 1:].contiguous(),
        "loss_mask": loss_mask,
        "attention_mask": None,
        "position_ids": torch.arange(seq, dtype=torch.int64).repeat(batch, 1),
    }


def pin_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """Page-lock a batch's tensors so the host-to-GPU copy can run asynchronously."""
    return {key: value.pin_memory() if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
