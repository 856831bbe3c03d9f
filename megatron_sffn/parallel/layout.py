"""How a tensor-parallel group holds each full factor, and which slice a rank holds.

A factor is declared by a :class:`FactorSpec` (its full shape and one of the
placements below); the structure plans (:mod:`.plans`) declare them, the
modules build parameters from them and the cost model counts them.  The rest
is pure index arithmetic, no process groups: the modules, the checkpoint
code, the planning tools and the tests all derive a rank's shard from these
functions, so a shard is defined in exactly one place.  Every layout here is
independent of the tensor-parallel size in the sense that matters for
checkpoints: the *global* tensors (and the FFN's hidden-unit order) are the
same at any TP size; only the slice a rank holds changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Placements: how a full factor of n elements is spread over the group.
SHARDED = "sharded"  # rank holds n/tp (split along ``axis``), computes n/tp per token
REPLICATED = "replicated"  # rank holds n, computes n per token
TOKEN_SPLIT = "token_split"  # rank holds n, computes n/tp per token (applied to 1/tp of the tokens)


@dataclass(frozen=True)
class FactorSpec:
    """A weight factor: its full (global, TP-independent) shape and how the group holds it.

    ``axis`` is the split axis of a sharded factor; ``strided`` marks fc1's
    output factor, whose split follows the gate/value parts of a gated FFN.
    """

    shape: tuple[int, ...]
    placement: str
    axis: int | None = None
    strided: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class TPLayout:
    """A rank's place in its tensor-parallel group."""

    rank: int
    size: int

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank={self.rank} is outside a group of size={self.size}")


def require_divisible(what: str, value: int, tp: int, unit: str = "tensor_model_parallel_size") -> None:
    """Raise a ValueError naming both numbers when ``value`` cannot be split ``tp`` ways."""
    if value % tp:
        raise ValueError(f"{what}={value} is not divisible by {unit}={tp}")


def shard_ranges(total: int, layout: TPLayout, stride: int = 1) -> list[slice]:
    """The ranges of ``range(total)`` a rank owns: ``stride`` equal parts, each cut in ``size`` chunks.

    ``stride`` > 1 describes a fused output such as a gated FFN's
    ``[gate, value]`` fc1: the rank owns chunk ``rank`` of every part, so the
    local tensor is ``[gate_r, value_r]`` exactly like megatron's
    ``ColumnParallelLinear(stride=2)``.
    """
    part = total // stride
    chunk = part // layout.size
    return [slice(p * part + layout.rank * chunk, p * part + (layout.rank + 1) * chunk) for p in range(stride)]


def take_rows(full: torch.Tensor, ranges: list[slice], dim: int = 0) -> torch.Tensor:
    """Concatenate the ``ranges`` of ``full`` along ``dim`` (a copy, detached from ``full``)."""
    return torch.cat([full.narrow(dim, r.start, r.stop - r.start) for r in ranges], dim=dim).clone()


def padded_tokens(tokens: int, tp: int) -> int:
    """Token count a token-split product runs on: ``tokens`` rounded up to a multiple of ``tp``.

    Token-split factors cut the flattened ``[s*b]`` tokens into ``tp`` equal
    contiguous slices; when ``s*b`` is not a multiple of ``tp`` the batch is
    padded with zero tokens, which costs at most ``tp - 1`` tokens of compute
    and changes no result (a zero token has zero output and zero gradient).
    """
    return -(-tokens // tp) * tp


def set_tp_attributes(param: torch.nn.Parameter, axis: int, stride: int) -> None:
    """Megatron's TP marks on a sharded parameter: gradient clipping counts it on every rank, not once."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    set_tensor_model_parallel_attributes(param, True, axis, stride)
