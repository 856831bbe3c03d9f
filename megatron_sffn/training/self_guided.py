"""Self-guided training in the trainer: guides on the model, their own DDP and optimizer, α, draws, switch-off.

The method is :mod:`megatron_sffn.structured.guided`; this module runs it
inside megatron's machinery.

Why the guides get their own data-parallel wrapper and optimizer
----------------------------------------------------------------
Guides are attached to the structured layers *after* the model is wrapped
in megatron's ``DistributedDataParallel`` and its optimizer is built, so the
model's contiguous grad buffers and the model optimizer never hold them.  A
second DDP (over a module that only lists the guides) gives them grad
buffers and the data-parallel reduction; a second megatron optimizer built
from the same ``OptimizerConfig`` gives them AdamW moments; megatron's
``ChainedOptimizer`` steps both and clips them *jointly* (one gradient norm
over everything, exactly as a single optimizer would).  Switching the guides
off is then dropping objects: the guide parameters leave the layers, the
second DDP (its buffers and hooks) and the second optimizer (its moments)
are released, and the model's DDP and optimizer continue untouched, so the
run goes on bit-exactly.  The alternative, rebuilding the model's DDP and
optimizer without the guides, would have to move optimizer state between
buffer layouts, which the distributed optimizer makes intricate.

The guides' gradients are finished like the model's: the finalize hook of
megatron's schedules runs ``finalize_model_grads`` for the model and then
reduces the guides over data-parallel ranks and divides them by the same
global token count.

Draws of the cost-saving variant
--------------------------------
Each structured linear ``(layer, fc1|fc2)`` decides per micro-batch whether
its dense branch runs, from :func:`~megatron_sffn.structured.guided.guide_draw`
of ``(seed, step, global micro-batch, linear)``, where the global micro-batch
is ``dp_rank * micro_batches + index``.  Tensor-parallel ranks of a layer and
pipeline stages agree without communicating, and a resumed run repeats the
uninterrupted run's draws.  The index comes from counting calls of the
schedules' forward-step function, which run once per micro-batch in order on
every stage; activation recomputation would rerun a layer's forward outside
that order, which is why SGT refuses full recomputation.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from ..parallel.base import TPStructuredLinear
from ..planning.steps import run_sgt_steps
from ..structured.guided import drawn_alpha, guide_alpha

STATE_FORMAT = "megatron-sffn/sgt-v1"
_ROLES = ("linear_fc1", "linear_fc2")


@dataclass(frozen=True)
class GuidancePlan:
    """What a run's SGT settings resolve to: the guided phase, its schedule and the draws' seed.

    ``guided_steps`` is T: updates 1..T use the guides, with α(t) for update t + 1.
    """

    guided_steps: int
    schedule: str = "cosine"
    stochastic: bool = True
    seed: int = 0

    def alpha_for_update(self, step: int) -> float:
        """α of update ``step`` (1-based): α(step − 1)."""
        return guide_alpha(step - 1, self.guided_steps, self.schedule)

    def guides_needed_after(self, completed_steps: int) -> bool:
        """Whether a run that has completed ``completed_steps`` updates still has guided updates ahead."""
        return completed_steps < self.guided_steps

    def state_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, **dataclasses.asdict(self)}

    def check_resume(self, saved: dict[str, Any] | None, where: str) -> None:
        """A run must resume under the plan it was saved with (the saved α is a record, not part of the plan)."""
        from .checkpointing import require_same_plan

        require_same_plan(self.state_dict(), saved, where, "self-guided training", "sgt.enabled")


@dataclass(frozen=True)
class GuidedSlot:
    """One structured linear that carries a guide; ``key`` names it in the draws."""

    key: int
    linear: TPStructuredLinear


def guided_slots(model_chunks: list) -> list[GuidedSlot]:
    """Every structured fc1/fc2 of this rank, keyed ``2 * layer_number + role`` (global layer numbers)."""
    slots = []
    for chunk in model_chunks:
        for module in chunk.modules():
            number, mlp = getattr(module, "layer_number", None), getattr(module, "mlp", None)
            if number is None or mlp is None:
                continue
            for role, name in enumerate(_ROLES):
                linear = getattr(mlp, name, None)
                if isinstance(linear, TPStructuredLinear):
                    slots.append(GuidedSlot(2 * number + role, linear))
    return slots


class _GuideBank(torch.nn.Module):
    """Lists the guide parameters (shared with the layers) so that a DDP and an optimizer can own them."""

    def __init__(self, guides: list[torch.nn.Parameter]) -> None:
        super().__init__()
        self.guides = torch.nn.ParameterList(guides)


class SelfGuidance:
    """The guides of one rank's model chunks, from attachment to switch-off.

    The trainer calls :meth:`begin_step` before each update's forward passes,
    :meth:`before_micro_batch` before each micro-batch's forward (the hook of
    the forward-step function), and :meth:`end_step` after the update; it
    steps :attr:`optimizer` (the chained optimizer while guides exist, the
    model's own afterwards), asking for it each time.  The switch-off swaps
    that optimizer and rebinds the LR scheduler of :meth:`bind_scheduler`
    to it, here and nowhere else.  With ``plan`` None (a run without SGT)
    every call is a no-op and :attr:`optimizer` is the model's, so the
    trainer needs no special case.
    """

    def __init__(
        self, plan: GuidancePlan | None, model_chunks: list, model_optimizer, *, micro_batches: int, dp_rank: int
    ) -> None:
        self.plan = plan
        self.model_chunks = model_chunks
        self.model_optimizer = model_optimizer
        self.micro_batches = micro_batches
        self.dp_rank = dp_rank
        self.slots: list[GuidedSlot] = []
        self.guide_ddp = None
        self.optimizer = model_optimizer
        self.scheduler = None
        self._plain_finalize: Callable | None = None
        self._step = 0
        self._alpha = 0.0
        self._draws = 0
        self._uses = 0

    # -- life cycle ---------------------------------------------------------------

    @property
    def attached(self) -> bool:
        return self.guide_ddp is not None

    def attach(self) -> None:
        """Give every structured linear its guide, with a DDP and an optimizer of their own (collective)."""
        from megatron.core.distributed import DistributedDataParallel
        from megatron.core.optimizer import ChainedOptimizer, get_megatron_optimizer
        from megatron.core.utils import get_model_config

        if self.plan is None or self.attached:
            raise RuntimeError("guides are attached once, and only by a run with self-guided training")
        self.slots = guided_slots(self.model_chunks)
        guides = [slot.linear.attach_guide() for slot in self.slots]
        model = self.model_chunks[0]
        config = get_model_config(model)
        self.guide_ddp = DistributedDataParallel(
            config=config, ddp_config=dataclasses.replace(model.ddp_config), module=_GuideBank(guides)
        )
        self.guide_ddp.broadcast_params()
        guide_optimizer = get_megatron_optimizer(self.model_optimizer.config, [self.guide_ddp])
        self.optimizer = ChainedOptimizer(_sub_optimizers(self.model_optimizer) + _sub_optimizers(guide_optimizer))
        self._plain_finalize = config.finalize_model_grads_func
        config.finalize_model_grads_func = self._finalize

    def switch_off(self) -> None:
        """Drop the guides for good: parameters, grad buffers, optimizer moments, compute."""
        if not self.attached:
            return
        from megatron.core.utils import get_model_config

        for slot in self.slots:
            slot.linear.drop_guide()
        get_model_config(self.model_chunks[0]).finalize_model_grads_func = self._plain_finalize
        self.guide_ddp = None
        self.optimizer = self.model_optimizer
        if self.scheduler is not None:
            self.scheduler.optimizer = self.optimizer

    def bind_scheduler(self, scheduler):
        """Let ``scheduler`` (built over :attr:`optimizer`) follow the optimizer swap of the switch-off; returns it."""
        self.scheduler = scheduler
        return scheduler

    def checkpoint_state(self, completed_steps: int) -> dict[str, Any] | None:
        """What a checkpoint records: the plan (checked by :meth:`prepare_resume`) and the α the next update uses."""
        if self.plan is None:
            return None
        return {**self.plan.state_dict(), "alpha": self.plan.alpha_for_update(completed_steps + 1)}

    def prepare_resume(self, saved: dict[str, Any] | None, completed_steps: int, where: str) -> None:
        """Before loading this run's checkpoint (``saved``: its ``sgt`` record): same plan, same guides.

        A checkpoint saved after the switch-off has no guides and no guide
        optimizer, so the guides are switched off before loading it.
        """
        if self.plan is None:
            refuse_guided_checkpoint(saved, completed_steps, where)
            return
        self.plan.check_resume(saved, where)
        if not self.plan.guides_needed_after(completed_steps):
            self.switch_off()

    @contextlib.contextmanager
    def guides_hidden(self) -> Iterator[None]:
        """Leave the guides out of the model's state (to load weights saved without them), then restore them."""
        guides = [(slot.linear, slot.linear.guide) for slot in self.slots]
        for linear, _ in guides:
            linear.guide = None
        try:
            yield
        finally:
            for linear, guide in guides:
                linear.guide = guide

    @torch.no_grad()
    def reset_guides(self) -> None:
        """Set every guide to its layer's current dense equivalent (after the factors were loaded; collective)."""
        for slot in self.slots:
            if slot.linear.guide is not None:
                slot.linear.guide.copy_(slot.linear.dense_shard())

    def _finalize(self, model: list, num_tokens: torch.Tensor | None, **kwargs: Any) -> None:
        """megatron's gradient finalisation, then the same for the guides (DP reduction, per-token scaling)."""
        self._plain_finalize(model, num_tokens, **kwargs)
        if self.guide_ddp is None:
            return
        self.guide_ddp.finish_grad_sync(force_all_reduce=kwargs.get("force_all_reduce", False))
        if num_tokens is not None and num_tokens > 0:  # global count: finalize_model_grads reduced it in place
            self.guide_ddp.scale_gradients(1.0 / num_tokens)

    # -- per step ------------------------------------------------------------------

    def begin_step(self, step: int) -> None:
        """Prepare update ``step`` (1-based): its α, fresh guide gradients, zeroed counters."""
        self._step = step
        self._alpha = self.plan.alpha_for_update(step) if self.attached else 0.0
        self._draws = self._uses = 0
        if self.guide_ddp is not None:
            self.guide_ddp.zero_grad_buffer()
        for slot in self.slots:
            slot.linear.guide_alpha = 0.0

    def before_micro_batch(self, index: int) -> None:
        """Set each guided linear's mixing weight for micro-batch ``index`` of this rank's share of the step."""
        if not self.attached:
            return
        global_index = self.dp_rank * self.micro_batches + index
        for slot in self.slots:
            weight = drawn_alpha(
                self._alpha, self.plan.seed, self._step, global_index, slot.key, stochastic=self.plan.stochastic
            )
            slot.linear.guide_alpha = weight
            self._draws += 1
            self._uses += weight > 0.0

    def begin_evaluation(self, completed_steps: int) -> None:
        """Evaluate the model being trained: every guided linear mixes with the α of the next update.

        No draws: an evaluation measures the guided model ``α W_g x + (1 − α) structured(x)``
        itself, identically on every rank and micro-batch.
        """
        alpha = self.plan.alpha_for_update(completed_steps + 1) if self.attached else 0.0
        for slot in self.slots:
            slot.linear.guide_alpha = alpha

    def end_step(self, step: int) -> bool:
        """After update ``step``: switch the guides off once α has reached 0; True when that happened now."""
        if self.attached and not self.plan.guides_needed_after(step):
            self.switch_off()
            return True
        return False

    def grad_chunks(self) -> list:
        """DDP wrappers whose gradient buffers hold the guides' gradients (for non-finite checks)."""
        return [self.guide_ddp] if self.guide_ddp is not None else []

    def metrics(self) -> dict[str, float]:
        """α of the last update and the fraction of this rank's draws that ran the dense branch."""
        if self.plan is None:
            return {}
        rate = self._uses / self._draws if self._draws else 0.0
        return {"sgt/alpha": self._alpha, "sgt/guide_use_rate": rate}


def refuse_guided_checkpoint(saved: dict[str, Any] | None, completed_steps: int, where: str) -> None:
    """A run without SGT cannot continue a checkpoint that still carries guides (and their optimizer)."""
    if saved is not None and completed_steps < int(saved["guided_steps"]):
        raise ValueError(
            f"{where} was saved during self-guided training (step {completed_steps} of a "
            f"{saved['guided_steps']}-step guided phase); resume it with its sgt settings {saved}"
        )


def build_guidance(config, model_chunks: list, model_optimizer, *, micro_batches: int, dp_rank: int) -> SelfGuidance:
    """The run's guidance, its guides attached (collective); inert when ``config.sgt`` is off."""
    steps = run_sgt_steps(config)
    plan = None
    if steps is not None:
        plan = GuidancePlan(steps.guided_steps, config.sgt.schedule, config.sgt.stochastic, config.training.seed)
    guidance = SelfGuidance(plan, model_chunks, model_optimizer, micro_batches=micro_batches, dp_rank=dp_rank)
    if plan is not None:
        guidance.attach()
    return guidance


class GuidedDataReplay:
    """Same-FLOPs mode: after the S base steps the stream restarts at the guided phase's first sample.

    The guided phase starts at step 0, so its first sample is the fresh
    stream's position, taken before any checkpoint is loaded.  Whether the
    restart is due depends only on the step, and the stream's own position is
    in every checkpoint, so a resumed run restarts exactly when (and only if)
    the uninterrupted run did.
    """

    def __init__(self, stream, restart_after: int) -> None:
        self.start_state = stream.state_dict()
        self.restart_after = restart_after

    def due(self, next_step: int) -> bool:
        return next_step == self.restart_after + 1

    def restart(self, stream, global_state: dict[str, Any]) -> None:
        """Rewind ``stream``; the loader's counters (``global_state``, all ranks merged) carry on."""
        stream.load_state_dict({**self.start_state, "stats": global_state["stats"]})


def _sub_optimizers(optimizer) -> list:
    """The optimizers inside a megatron ``ChainedOptimizer`` (or the optimizer itself)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))
