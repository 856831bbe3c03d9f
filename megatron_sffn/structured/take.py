"""``take``: the rows (or columns) of a weight at given indices, with a backward that copies instead of adding.

Evolving subnetwork training multiplies by gathered slices of its weights
every step.  ``weight[index]`` is differentiable, but its backward is an
accumulating ``index_put_``, which on the CPU costs about a quarter of the
time a half-width FFN saves at 512 tokens (``benchmarks/est_bench.py``).  The
indices of one ``take`` are distinct, so the gradient can be placed with
``index_copy_`` into zeros instead: the same gradient, cheaper.
"""

from __future__ import annotations

import torch


class _Take(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.dim, ctx.shape = dim, weight.shape
        return weight.index_select(dim, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        full = grad.new_zeros(ctx.shape)
        full.index_copy_(ctx.dim, index, grad)
        return full, None, None


def take(weight: torch.Tensor, index: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``weight.index_select(dim, index)`` for *distinct* ``index`` values; gradient flows to those only."""
    return _Take.apply(weight, index, dim)
