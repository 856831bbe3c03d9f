"""Evolving subnetwork training in the trainer: each step's draw on the layers, its FLOPs, its record.

The method and its draws are :mod:`megatron_sffn.est`; the layers that run
a subnetwork are built by the model builder (``subnetworks=True``, the same
parameters as the plain model).  Before each update the trainer calls
:meth:`EvolvingSubnetworks.begin_step`: every rank draws the step's whole
subnetwork from the counters and hands each of its layers its part, so
tensor-parallel ranks and pipeline stages agree without communicating and
all micro-batches of the step (and any recomputation) run the same
subnetwork.  Evaluation runs the full model.

Parameters outside a step's subnetwork
--------------------------------------
They get a zero gradient, not no gradient: megatron's DDP accumulates into
contiguous gradient buffers that are zeroed every step, and its optimizer
hands every parameter its buffer, so AdamW updates them like any parameter
with a zero gradient — the first moment decays by β1, the second by β2, the
remaining momentum still moves the weight, and decoupled weight decay
applies.  That is deliberate: it is what training the sampled network's
loss means (the dropped units' gradient *is* zero, exactly as under dropout,
on which the paper's analysis rests), it keeps every parameter's bias
correction on the global step count, and it needs no per-row bookkeeping in
the (distributed) optimizer.  The alternative, freezing the moments and the
weight of unsampled rows ("lazy" Adam), would make an update depend on how
long ago a unit was last sampled.  ``tests/test_est.py`` checks the update
of a skipped layer and of dropped hidden units against this rule.
"""

from __future__ import annotations

from typing import Any

from ..accounting.est import step_forward_flops
from ..accounting.model import TRAINING_FLOPS_PER_FORWARD, training_flops_per_token
from ..config.model import ModelConfig
from ..est import ESTPlan, LayerDraw
from .checkpointing import require_same_plan


def subnetwork_layers(model_chunks: list) -> list:
    """This rank's decoder layers that can run a subnetwork (built with ``subnetworks=True``)."""
    return [m for chunk in model_chunks for m in chunk.modules() if hasattr(m, "select") and hasattr(m, "layer_number")]


class EvolvingSubnetworks:
    """The draws of one rank's layers, step by step; with ``plan`` None every call is a no-op."""

    def __init__(self, plan: ESTPlan | None, model: ModelConfig, model_chunks: list) -> None:
        self.plan = plan
        self.model = model
        self.layers = subnetwork_layers(model_chunks) if plan is not None else []
        self.full_flops_per_token = training_flops_per_token(model)
        self._draws: list[LayerDraw] | None = None
        self._stage = 3

    def begin_step(self, step: int) -> None:
        """Give every layer its part of update ``step``'s subnetwork (1-based)."""
        if self.plan is None:
            return
        rates = self.plan.rates(step)
        self._stage = rates.stage
        self._draws = None if rates.full else self.plan.draw(step)
        self._apply(self._draws)

    def begin_evaluation(self) -> None:
        """Evaluate the full model (the draws of the next step are set by its :meth:`begin_step`)."""
        self._apply(None)

    def _apply(self, draws: list[LayerDraw] | None) -> None:
        for layer in self.layers:
            layer.select(draws[layer.layer_number - 1] if draws is not None else None)

    def training_flops_per_token(self) -> float:
        """Training FLOPs per token of the current step: its subnetwork's, by the MFU formula."""
        if self._draws is None:
            return self.full_flops_per_token
        return TRAINING_FLOPS_PER_FORWARD * step_forward_flops(self.model, self._draws).total

    def metrics(self) -> dict[str, float]:
        """The stage and the size of the step's subnetwork (fractions of the full model)."""
        if self.plan is None:
            return {}
        draws = self._draws or []
        active = [d for d in draws if d.active]
        heads = [d.heads.count / self.model.num_attention_heads if d.heads is not None else 1.0 for d in active]
        hidden = [d.hidden.count / self.model.ffn_hidden_size if d.hidden is not None else 1.0 for d in active]
        return {
            "est/stage": float(self._stage),
            "est/layers_fraction": len(active) / self.model.num_layers if draws else 1.0,
            "est/heads_fraction": sum(heads) / len(heads) if heads else 1.0,
            "est/hidden_fraction": sum(hidden) / len(hidden) if hidden else 1.0,
            "est/flops_fraction": self.training_flops_per_token() / self.full_flops_per_token,
        }

    def checkpoint_state(self, completed_steps: int) -> dict[str, Any] | None:
        """The plan (the same at every step: ``completed_steps`` does not change it)."""
        return self.plan.state_dict() if self.plan is not None else None

    def prepare_resume(self, saved: dict[str, Any] | None, completed_steps: int, where: str) -> None:
        """Before loading this run's checkpoint: the same plan, or (without EST) no EST stage left unfinished."""
        if saved is not None and "hidden_groups" not in saved:  # saved before BlockShuffle subsets: no cells anywhere
            saved = {**saved, "hidden_groups": [1] * int(saved["num_layers"])}
        if self.plan is not None:
            require_same_plan(self.plan.state_dict(), saved, where, "evolving subnetwork training", "est.enabled")
            return
        if saved is not None and completed_steps < int(saved["stage2_steps"]):
            raise ValueError(
                f"{where} was saved during evolving subnetwork training (step {completed_steps}, stages "
                f"1-2 end at step {saved['stage2_steps']}); resume it with its est settings"
            )
