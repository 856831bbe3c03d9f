"""Detecting a non-finite step and deciding whether training may go on.

A NaN/Inf loss (or gradient) is usually a transient event in a long run: a
bad batch or a loss spike.  Applying such an update would destroy the
weights, so the step is skipped: its gradients are discarded and the
parameters and optimizer moments stay as they were.  A streak of them means
the run has diverged; continuing would only burn compute, so after
``max_consecutive`` skipped steps in a row training stops with an error that
says so.

The loss lives on the last pipeline stage only and each rank holds only its
part of the gradients, so the decision is taken from flags reduced across
all ranks (:func:`local_nonfinite_flags`) and every rank skips the same step.
"""

from __future__ import annotations

import math

import torch

from .state import TrainProgress


class NonFiniteTrainingError(RuntimeError):
    """Raised when too many consecutive steps had a non-finite loss or gradient."""


def local_nonfinite_flags(loss_sum: float | None, model_chunks) -> tuple[float, float]:
    """``(loss_flag, grad_flag)``: 1.0 where this rank sees a NaN/Inf, else 0.0.

    ``loss_sum`` is None on ranks that compute no loss (pipeline stages
    before the last).  The gradient test sums each of megatron DDP's
    contiguous gradient buffers: one pass over memory, and the sum is finite
    exactly when no element is NaN/Inf (barring an fp32 overflow of the sum,
    itself a divergence).
    """
    loss_flag = 0.0 if loss_sum is None or math.isfinite(loss_sum) else 1.0
    grad_flag = 0.0
    for chunk in model_chunks:
        for buffer in list(chunk.buffers) + list(chunk.expert_parallel_buffers):
            if not bool(torch.isfinite(buffer.grad_data.sum())):
                grad_flag = 1.0
                break
    return loss_flag, grad_flag


def record_step(progress: TrainProgress, nonfinite: bool, max_consecutive: int) -> None:
    """Count a finished step in ``progress``; raise once ``max_consecutive`` non-finite steps came in a row."""
    if not nonfinite:
        progress.consecutive_nonfinite = 0
        return
    progress.skipped_steps += 1
    progress.consecutive_nonfinite += 1
    if progress.consecutive_nonfinite >= max_consecutive:
        raise NonFiniteTrainingError(
            f"step {progress.step}: {progress.consecutive_nonfinite} consecutive steps had a non-finite loss or "
            f"gradient (training.max_consecutive_nonfinite={max_consecutive}); the run has diverged. "
            f"Resume from an earlier checkpoint with a lower optimizer.lr or a stronger optimizer.clip_grad."
        )
