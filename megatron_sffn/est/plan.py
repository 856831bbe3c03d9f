"""A run's EST schedule resolved: stage boundaries in steps, rates, strata, and each step's draw.

Built from the ``model`` and ``est`` sections and the run's length and
layout (:func:`build_plan`); :func:`plan_problems` says, with the config keys
at fault, why a setting cannot be drawn (rates whose kept counts are not
whole numbers per stratum, strata that do not split the heads, hidden units,
blocks, layers or the parallel layout).

Hidden units are stratified per layer by its FFN: by TP shard (dense,
LowRank), by block of fc2's K (BlockDense), or by the B² (fc2 block, fc1
group) cells of a BlockShuffle FFN (:mod:`.draws`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..config.est import ESTConfig
from ..config.model import ModelConfig
from .draws import HEADS, HIDDEN, LAYERS, LayerDraw, draw_subset, kept_count

STATE_FORMAT = "megatron-sffn/est-v1"


@dataclass(frozen=True)
class StageRates:
    """The rates of one stage (stage 3 and a stage whose rates are all 1 train the full model)."""

    stage: int
    p_L: float = 1.0
    p_H: float = 1.0
    p_M: float = 1.0

    @property
    def full(self) -> bool:
        return self.p_L == self.p_H == self.p_M == 1.0


@dataclass(frozen=True)
class ESTPlan:
    """Everything that decides a step's subnetwork; saved in checkpoints so that a resume keeps it."""

    seed: int
    total_steps: int
    stage1_steps: int  # stage 1 is steps 1..stage1_steps
    stage2_steps: int  # stage 2 is steps stage1_steps + 1..stage2_steps
    stage1: StageRates
    stage2: StageRates
    num_layers: int
    heads: int
    query_groups: int
    hidden: int
    hidden_strata: tuple[int, ...]  # per layer: tensor_strata, the blocks of a BlockDense FFN, or B² BlockShuffle cells
    hidden_groups: tuple[int, ...]  # per layer: the blocks B of a BlockShuffle FFN (cells), else 1
    tensor_strata: int
    layer_strata: int

    def rates(self, step: int) -> StageRates:
        """The rates of update ``step`` (1-based)."""
        if step <= self.stage1_steps:
            return self.stage1
        if step <= self.stage2_steps:
            return self.stage2
        return StageRates(3)

    def draw(self, step: int) -> list[LayerDraw]:
        """Every layer's part of update ``step``'s subnetwork."""
        rates = self.rates(step)
        kept_layers = set(range(self.num_layers))
        if rates.p_L < 1.0:
            keep = kept_count(rates.p_L, self.num_layers // self.layer_strata)
            layers = draw_subset(self.seed, step, LAYERS, 0, total=self.num_layers, strata=self.layer_strata, keep=keep)
            kept_layers = set(layers.indices().tolist())
        draws = []
        for layer in range(self.num_layers):
            if layer not in kept_layers:
                draws.append(LayerDraw(layer, active=False, p_H=rates.p_H, p_M=rates.p_M))
                continue
            heads = hidden = None
            if rates.p_H < 1.0:
                keep = kept_count(rates.p_H, self.heads // self.tensor_strata)
                heads = draw_subset(
                    self.seed, step, HEADS, layer, total=self.heads, strata=self.tensor_strata, keep=keep
                )
            if rates.p_M < 1.0:
                strata = self.hidden_strata[layer]
                keep = kept_count(rates.p_M, self.hidden // strata)
                hidden = draw_subset(
                    self.seed,
                    step,
                    HIDDEN,
                    layer,
                    total=self.hidden,
                    strata=strata,
                    keep=keep,
                    groups=self.hidden_groups[layer],
                )
            draws.append(LayerDraw(layer, True, heads, hidden, rates.p_H, rates.p_M))
        return draws

    def state_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, **_plain(dataclasses.asdict(self))}


def _plain(value: Any) -> Any:
    """Tuples as lists, so that a plan compares equal to its JSON round trip."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class _HiddenStrata:
    """How one layer's hidden units are stratified, and how messages name that."""

    strata: int
    groups: int
    what: str  # the units of one stratum
    key: str  # the config key that sets the strata


def _hidden_strata(model: ModelConfig, tensor_strata: int, tensor_key: str) -> list[_HiddenStrata]:
    """Per layer: by TP stratum, by BlockDense block, or by BlockShuffle (fc2 block, fc1 group) cell."""
    b = model.ffn.blocks
    tensor = structured = _HiddenStrata(tensor_strata, 1, "hidden units", tensor_key)
    if model.ffn.structure == "blockdense":
        structured = _HiddenStrata(b, 1, f"hidden units of each of the model.ffn.blocks={b} blocks", "model.ffn.blocks")
    elif model.ffn.structure == "blockshuffle":
        structured = _HiddenStrata(
            b * b, b, "hidden units (one fc2 block's rows of one fc1 group)", f"model.ffn.blocks²={b}²"
        )
    return [structured if model.ffn.is_structured(layer) else tensor for layer in range(model.num_layers)]


def _strata(est: ESTConfig, tensor_parallel: int, pipeline_parallel: int) -> tuple[int, int]:
    tensor = est.tensor_strata if est.tensor_strata is not None else tensor_parallel
    layer = est.layer_strata if est.layer_strata is not None else pipeline_parallel
    return tensor, layer


def plan_problems(
    model: ModelConfig, est: ESTConfig, tensor_parallel: int = 1, pipeline_parallel: int = 1
) -> list[str]:
    """Why ``est`` cannot be drawn for ``model`` at this layout, each naming its keys (empty: it can)."""
    problems = []
    tensor, layer = _strata(est, tensor_parallel, pipeline_parallel)
    tensor_key = (
        "est.tensor_strata" if est.tensor_strata is not None else "est.tensor_strata (null: parallel.tensor_parallel)"
    )
    layer_key = (
        "est.layer_strata" if est.layer_strata is not None else "est.layer_strata (null: parallel.pipeline_parallel)"
    )
    for key, strata, size, name in (
        (tensor_key, tensor, tensor_parallel, "parallel.tensor_parallel"),
        (layer_key, layer, pipeline_parallel, "parallel.pipeline_parallel"),
    ):
        if strata % size:
            problems.append(f"{key}={strata} is not a multiple of {name}={size}: ranks would do unequal work")
    units = [
        (
            "model.num_attention_heads",
            model.num_attention_heads,
            tensor,
            tensor_key,
            [("est.stage1.p_H", est.stage1.p_H), ("est.stage2.p_H", est.stage2.p_H)],
            "heads",
        ),
        ("model.num_layers", model.num_layers, layer, layer_key, [("est.stage1.p_L", est.stage1.p_L)], "layers"),
    ]
    for hidden in dict.fromkeys(_hidden_strata(model, tensor, tensor_key)):
        units.append(
            (
                "model.ffn_hidden_size",
                model.ffn_hidden_size,
                hidden.strata,
                hidden.key,
                [("est.stage1.p_M", est.stage1.p_M), ("est.stage2.p_M", est.stage2.p_M)],
                hidden.what,
            )
        )
    for size_key, size, strata, strata_key, rates, what in units:
        if size % strata:
            problems.append(f"{strata_key}={strata} does not divide {size_key}={size}")
            continue
        per = size // strata
        for rate_key, rate in rates:
            if rate < 1.0 and kept_count(rate, per) is None:
                problems.append(
                    f"{rate_key}={rate} keeps {rate} x {per} {what} of each of the {strata} equal parts "
                    f"({size_key}={size} / {strata_key}={strata}); that must be a whole number >= 1"
                )
    if model.ffn.structure in ("blockdense", "blockshuffle") and model.ffn.blocks % tensor:
        problems.append(f"{tensor_key}={tensor} does not divide model.ffn.blocks={model.ffn.blocks}")
    return problems


def build_plan(
    model: ModelConfig,
    est: ESTConfig,
    *,
    total_steps: int,
    seed: int,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
) -> ESTPlan:
    """The plan of a run of ``total_steps``; raises ValueError with every problem of :func:`plan_problems`."""
    problems = plan_problems(model, est, tensor_parallel, pipeline_parallel)
    if problems:
        raise ValueError("\n".join(problems))
    tensor, layer = _strata(est, tensor_parallel, pipeline_parallel)
    hidden = _hidden_strata(model, tensor, "est.tensor_strata")
    first, second = (math.floor(end * total_steps) for end in est.stage_ends)
    return ESTPlan(
        seed=est.seed if est.seed is not None else seed,
        total_steps=total_steps,
        stage1_steps=first,
        stage2_steps=second,
        stage1=StageRates(1, est.stage1.p_L, est.stage1.p_H, est.stage1.p_M),
        stage2=StageRates(2, 1.0, est.stage2.p_H, est.stage2.p_M),
        num_layers=model.num_layers,
        heads=model.num_attention_heads,
        query_groups=model.num_query_groups,
        hidden=model.ffn_hidden_size,
        hidden_strata=tuple(h.strata for h in hidden),
        hidden_groups=tuple(h.groups for h in hidden),
        tensor_strata=tensor,
        layer_strata=layer,
    )
