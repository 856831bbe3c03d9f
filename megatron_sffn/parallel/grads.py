"""Gradients of token-split weights: data parallelism inside the tensor-parallel group.

A token-split factor is replicated on every TP rank but each rank applies it
to its own 1/tp of the tokens, so each rank's weight gradient covers only its
tokens.  That is exactly data parallelism, and it is finished the same way,
once per optimizer step rather than once per micro-batch: the backward scales
the weight's gradient by tp (making it the full-batch gradient *estimated*
from the rank's tokens), the parameter carries megatron's
``average_gradients_across_tp_domain`` flag, and megatron's
``finalize_model_grads`` averages flagged gradients over the TP group, which
gives the exact full-batch gradient.  The cost is one coalesced all-reduce of
these weights per step, independent of the number of micro-batches and
tokens.  Training loops that do not call ``finalize_model_grads`` must call
:func:`average_token_split_grads` instead, before clipping and the step.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist

from .comm import ShapeOnlyGroup

TP_AVERAGED = "average_gradients_across_tp_domain"


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, factor):
        ctx.factor = factor
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def mark_token_split(param: torch.nn.Parameter) -> None:
    """Flag ``param`` so that megatron averages its gradient over the tensor-parallel group."""
    setattr(param, TP_AVERAGED, True)


def token_split_weight(param: torch.nn.Parameter, tp: int) -> torch.Tensor:
    """``param`` for use on 1/tp of the tokens: its gradient comes back scaled by ``tp``."""
    return param if tp == 1 else _ScaleGrad.apply(param, tp)


def average_token_split_grads(modules: Iterable[torch.nn.Module], group) -> None:
    """Average the gradients of flagged parameters over ``group`` (what ``finalize_model_grads`` does).

    Reads ``main_grad`` when megatron's DDP created one, ``grad`` otherwise.
    """
    if isinstance(group, ShapeOnlyGroup) or group.size() == 1:
        return
    grads = []
    for module in modules:
        for param in module.parameters():
            if getattr(param, TP_AVERAGED, False):
                grad = getattr(param, "main_grad", None)
                grad = param.grad if grad is None else grad
                if grad is not None:
                    grads.append(grad)
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.AVG, group=group)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()
