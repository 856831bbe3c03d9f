"""One training step through megatron's schedules, and the per-token language-model loss.

A step runs the micro-batches of this rank's share of the global batch
through ``get_forward_backward_func()`` (pipelined when PP > 1), then takes
one decision for all ranks from a single all-reduce of five numbers:

    [loss sum, token count, non-finite loss, non-finite gradient, stop requested]

The loss sum and token count are contributed by one rank per pipeline
replica (last stage, tensor-parallel rank 0), so after the reduction every
rank knows the global mean loss; the flags tell every rank whether to skip
the update (:mod:`.nonfinite`) and whether a pre-emption signal arrived on
any of them (:mod:`.signals`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from .nonfinite import local_nonfinite_flags


def lm_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """megatron's three-value loss contract: (sum of masked token losses, token count, report)."""
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.reshape(-1).float()
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), num_tokens.detach().float()])
    return loss_sum, num_tokens, {"lm_loss": report}


def make_forward_step(before_micro_batch: Callable[[int], None] | None = None) -> Callable:
    """The schedules' ``forward_step_func``: every stage receives the batch, each uses what it needs.

    ``before_micro_batch(index)`` runs before each micro-batch's forward with
    its index in this step (the schedules run forwards in micro-batch order on
    every stage); self-guided training draws its per-micro-batch decisions there.
    """
    indices = itertools.count()

    def forward_step(data_iterator, model):
        if before_micro_batch is not None:
            before_micro_batch(next(indices))
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"])
        return output, partial(lm_loss, batch["loss_mask"])

    return forward_step


def to_device(batch: dict[str, Any]) -> dict[str, Any]:
    """Move a loader batch to this rank's GPU (a no-op on the CPU)."""
    if not torch.cuda.is_available():
        return batch
    device = torch.cuda.current_device()
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def sum_reports(reports: list[dict[str, torch.Tensor]]) -> tuple[float, float] | None:
    """(loss sum, token count) over the micro-batches a last pipeline stage reported; None elsewhere."""
    if not reports:
        return None
    total = torch.stack([r["lm_loss"] for r in reports]).sum(dim=0)
    return float(total[0]), float(total[1])


def run_schedule(
    model: list,
    micro_batches: list[dict[str, Any]],
    forward_step: Callable,
    *,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool,
) -> tuple[float, float] | None:
    """One call of megatron's schedule over ``micro_batches``: (loss sum, token count) on a reporting stage.

    Training and evaluation share it so that both run the micro-batches the same way (pipelined when PP > 1).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    reports = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=model,
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    return sum_reports(reports)


def reports_this_replica() -> bool:
    """True on exactly one rank per pipeline replica: the one whose loss reports are counted."""
    from megatron.core import parallel_state

    return parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0


def reduce_step_numbers(loss: tuple[float, float] | None, flags: list[float]) -> list[float]:
    """All-reduce (sum) over the world: loss sum and count from reporting ranks, then flags."""
    loss_sum, count = loss if loss is not None and reports_this_replica() else (0.0, 0.0)
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    numbers = torch.tensor([loss_sum, count, *flags], dtype=torch.float64, device=device)
    dist.all_reduce(numbers)
    return numbers.tolist()


@dataclass
class StepResult:
    loss: float  # global mean token loss (NaN when non-finite)
    tokens_in_loss: int  # unmasked tokens that the loss averages over
    nonfinite: bool
    grad_norm: float | None  # None when the update was skipped (or clipping is off)
    stop_requested: bool


def train_step(
    model: list,
    optimizer,
    micro_batches: list[dict[str, Any]],
    *,
    seq_length: int,
    micro_batch_size: int,
    stop_flag: float,
    before_micro_batch: Callable[[int], None] | None = None,
    extra_grad_chunks: Sequence[Any] = (),
) -> StepResult:
    """Forward/backward over ``micro_batches``, then the update unless anything is non-finite.

    ``extra_grad_chunks``: DDP wrappers outside ``model`` whose gradients the
    optimizer also steps (self-guided training's guides); their buffers are
    checked for non-finite values too.
    """
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    forward_step = make_forward_step(before_micro_batch)
    local_loss = run_schedule(
        model, micro_batches, forward_step, seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=False
    )
    loss_flag, grad_flag = local_nonfinite_flags(local_loss[0] if local_loss else None, [*model, *extra_grad_chunks])
    loss_sum, count, bad_loss, bad_grad, stop = reduce_step_numbers(local_loss, [loss_flag, grad_flag, stop_flag])
    nonfinite = bad_loss > 0 or bad_grad > 0
    grad_norm = None
    if not nonfinite:
        _, grad_norm, _ = optimizer.step()
    loss = loss_sum / count if count > 0 else math.nan
    return StepResult(
        loss=loss,
        tokens_in_loss=int(count),
        nonfinite=nonfinite,
        grad_norm=None if grad_norm is None else float(grad_norm),
        stop_requested=stop > 0,
    )
