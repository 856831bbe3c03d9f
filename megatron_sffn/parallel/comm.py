"""Tensor-parallel collectives as autograd functions, with traffic accounting.

Every activation exchange of the structured FFNs goes through the functions
below.  Each one pairs a forward collective with the backward collective that
makes the gradient exact (an all-gather whose consumers hold *partial*
gradients is reduce-scattered on the way back; one whose consumers are
replicated is merely split), which is where tensor-parallel bugs usually hide.

Activations are 2-D ``(tokens, features)``.  "Tokens" collectives act on
dim 0 and assume the token count is a multiple of the group size (the layers
pad first, see :func:`..layout.padded_tokens`).

Traffic is counted as the elements one rank *sends* with bandwidth-optimal
algorithms: all-reduce of n elements = 2n(tp-1)/tp, all-gather /
reduce-scatter of a full tensor of n elements = n(tp-1)/tp, all-to-all of a
local tensor of n elements = n(tp-1)/tp.  :func:`record_traffic` collects
these while the modules run, which is how tests and the planning tool measure
communication from the real code path rather than from a formula.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator

import torch
import torch.distributed as dist


class ShapeOnlyGroup:
    """Stands in for a process group so that one rank's modules run alone.

    Planning tools build a single rank of a TP=8 layer without 8 processes;
    collectives against this group return tensors of the right shape whose
    values are meaningless, and still report their traffic.
    """

    def __init__(self, rank: int, size: int) -> None:
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"rank={rank} is outside a group of size={size}")
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


@dataclass(frozen=True)
class Transfer:
    """One collective as seen by one rank."""

    op: str
    direction: str  # "forward" or "backward"
    elements: Fraction  # elements this rank sends


_recorders: list[list[Transfer]] = []


@contextlib.contextmanager
def record_traffic() -> Iterator[list[Transfer]]:
    """Collect the :class:`Transfer` of every collective run (forward and backward) inside the block."""
    log: list[Transfer] = []
    _recorders.append(log)
    try:
        yield log
    finally:
        _recorders.remove(log)


def _note(op: str, direction: str, elements: int, tp: int, factor: int = 1) -> None:
    for log in _recorders:
        log.append(Transfer(op, direction, Fraction(factor * elements * (tp - 1), tp)))


# -- raw collectives (dim 0) --------------------------------------------------


def _all_reduce(x: torch.Tensor, group, direction: str) -> torch.Tensor:
    tp = group.size()
    _note("all_reduce", direction, x.numel(), tp, factor=2)
    if isinstance(group, ShapeOnlyGroup):
        return x.clone()
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _all_gather(x: torch.Tensor, group, direction: str) -> torch.Tensor:
    tp = group.size()
    _note("all_gather", direction, x.numel() * tp, tp)
    if isinstance(group, ShapeOnlyGroup):
        return torch.cat([x] * tp)
    out = x.new_empty((tp * x.shape[0], *x.shape[1:]))
    dist.all_gather_single(out, x.contiguous(), group=group)
    return out


def _reduce_scatter(x: torch.Tensor, group, direction: str) -> torch.Tensor:
    tp = group.size()
    _note("reduce_scatter", direction, x.numel(), tp)
    rows = x.shape[0] // tp
    if isinstance(group, ShapeOnlyGroup):
        return x.narrow(0, group.rank() * rows, rows).clone()
    out = x.new_empty((rows, *x.shape[1:]))
    dist.reduce_scatter_single(out, x.contiguous(), group=group)
    return out


def _all_to_all(x: torch.Tensor, group, direction: str) -> torch.Tensor:
    """Chunk ``i`` of dim 0 goes to rank ``i``; chunk ``j`` of the result came from rank ``j``."""
    _note("all_to_all", direction, x.numel(), group.size())
    if isinstance(group, ShapeOnlyGroup):
        return x.clone()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    dist.all_to_all_single(out, x.contiguous(), group=group)
    return out


def _own_chunk(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    size = x.shape[dim] // group.size()
    return x.narrow(dim, group.rank() * size, size).contiguous()


def _gather_last(x: torch.Tensor, group, direction: str) -> torch.Tensor:
    """(T, n) on every rank -> (T, tp*n), rank-major along features."""
    tp = group.size()
    stacked = _all_gather(x, group, direction).reshape(tp, *x.shape)
    return stacked.movedim(0, -2).reshape(*x.shape[:-1], tp * x.shape[-1])


def _reduce_scatter_last(x: torch.Tensor, group, direction: str) -> torch.Tensor:
    """(T, tp*n) partial on every rank -> (T, n): this rank's feature chunk, summed."""
    tp = group.size()
    chunks = x.reshape(*x.shape[:-1], tp, x.shape[-1] // tp).movedim(-2, 0)
    return _reduce_scatter(chunks.reshape(-1, x.shape[-1] // tp), group, direction).reshape(
        *x.shape[:-1], x.shape[-1] // tp
    )


# -- autograd functions -------------------------------------------------------


class _CopyToRegion(torch.autograd.Function):
    """Replicated input to rank-specific consumers: identity forward, all-reduce of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group, "backward"), None


class _ReduceFromRegion(torch.autograd.Function):
    """Partial sums to a replicated result: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group, "forward")

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFeatures(torch.autograd.Function):
    """Feature shards to full features; the backward reduce-scatters partial or splits replicated grads."""

    @staticmethod
    def forward(ctx, x, group, partial_grad):
        ctx.group, ctx.partial_grad = group, partial_grad
        return _gather_last(x, group, "forward")

    @staticmethod
    def backward(ctx, grad):
        if ctx.partial_grad:
            return _reduce_scatter_last(grad, ctx.group, "backward"), None, None
        return _own_chunk(grad, ctx.group, -1), None, None


class _SplitFeatures(torch.autograd.Function):
    """Replicated features to this rank's chunk; the backward all-gathers the chunk gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _own_chunk(x, group, -1)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group, "backward"), None


class _SplitTokens(torch.autograd.Function):
    """Replicated tokens to this rank's token slice; the backward all-gathers the slices."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _own_chunk(x, group, 0)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group, "backward"), None


class _GatherTokens(torch.autograd.Function):
    """Token slices to all tokens; the backward reduce-scatters partial or splits replicated grads."""

    @staticmethod
    def forward(ctx, x, group, partial_grad):
        ctx.group, ctx.partial_grad = group, partial_grad
        return _all_gather(x, group, "forward")

    @staticmethod
    def backward(ctx, grad):
        if ctx.partial_grad:
            return _reduce_scatter(grad, ctx.group, "backward"), None, None
        return _own_chunk(grad, ctx.group, 0), None, None


class _ReduceScatterTokens(torch.autograd.Function):
    """Partial sums over all tokens to this rank's token slice, summed; the backward all-gathers."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, group, "forward")

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group, "backward"), None


def _features_to_tokens(x: torch.Tensor, group, direction: str) -> torch.Tensor:
    tp = group.size()
    tokens, local = x.shape
    received = _all_to_all(x, group, direction)  # (tp * T/tp, n/tp): feature chunk j of my token slice
    return received.reshape(tp, tokens // tp, local).transpose(0, 1).reshape(tokens // tp, tp * local)


def _tokens_to_features(x: torch.Tensor, group, direction: str) -> torch.Tensor:
    tp = group.size()
    rows, full = x.shape
    outgoing = x.reshape(rows, tp, full // tp).transpose(0, 1).reshape(tp * rows, full // tp)
    return _all_to_all(outgoing, group, direction)


class _FeaturesToTokens(torch.autograd.Function):
    """All-to-all: (all tokens, my feature chunk) -> (my token slice, all features)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _features_to_tokens(x, group, "forward")

    @staticmethod
    def backward(ctx, grad):
        return _tokens_to_features(grad, ctx.group, "backward"), None


def _single(group) -> bool:
    return group.size() == 1


def copy_to_region(x: torch.Tensor, group) -> torch.Tensor:
    return x if _single(group) else _CopyToRegion.apply(x, group)


def reduce_from_region(x: torch.Tensor, group) -> torch.Tensor:
    return x if _single(group) else _ReduceFromRegion.apply(x, group)


def gather_features(x: torch.Tensor, group, *, partial_grad: bool) -> torch.Tensor:
    return x if _single(group) else _GatherFeatures.apply(x, group, partial_grad)


def split_features(x: torch.Tensor, group) -> torch.Tensor:
    return x if _single(group) else _SplitFeatures.apply(x, group)


def split_tokens(x: torch.Tensor, group) -> torch.Tensor:
    return x if _single(group) else _SplitTokens.apply(x, group)


def gather_tokens(x: torch.Tensor, group, *, partial_grad: bool) -> torch.Tensor:
    return x if _single(group) else _GatherTokens.apply(x, group, partial_grad)


def reduce_scatter_tokens(x: torch.Tensor, group) -> torch.Tensor:
    return x if _single(group) else _ReduceScatterTokens.apply(x, group)


def features_to_tokens(x: torch.Tensor, group) -> torch.Tensor:
    return x if _single(group) else _FeaturesToTokens.apply(x, group)
