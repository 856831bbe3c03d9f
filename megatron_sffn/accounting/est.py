"""Training FLOPs of evolving subnetwork training: one step's actual subnetwork and a run's expectation.

Both use the per-layer formula of :func:`.model.layer_forward_flops` (the one
behind MFU) with the subnetwork's counts: a skipped layer costs nothing, a
kept layer costs its kept query heads, the key/value groups they read and
its kept FFN hidden units; embeddings and logits are always computed.  The
FLOP saving is ``1 − Σ_t FLOPs(subnetwork_t) / Σ_t FLOPs(full)`` ("Evolving
Subnetwork Training for Large Language Models", Li et al., 2024).

The expectation over the draws is exact: the FLOPs are linear in the counts,
the kept counts are fixed per stratum, and the expected number of key/value
groups a stratified head draw reads is a sum of hypergeometric terms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config.model import ModelConfig
from ..est.draws import LayerDraw, kept_count
from ..est.plan import ESTPlan, StageRates
from .model import TRAINING_FLOPS_PER_FORWARD, ForwardFlops, layer_forward_flops, sum_forward_flops


def _logits(cfg: ModelConfig) -> int:
    return 2 * cfg.vocab_size * cfg.hidden_size


def step_forward_flops(cfg: ModelConfig, draws: list[LayerDraw]) -> ForwardFlops:
    """Forward FLOPs per token of one step's subnetwork (``draws``: every layer's part of it)."""
    per_group = cfg.num_attention_heads // cfg.num_query_groups
    layers = [
        layer_forward_flops(
            cfg,
            d.layer,
            heads=d.heads.count if d.heads is not None else None,
            kv_groups=d.kv_groups(per_group),
            hidden=d.hidden.count if d.hidden is not None else None,
        )
        if d.active
        else layer_forward_flops(cfg, d.layer, heads=0, kv_groups=0, hidden=0)
        for d in draws
    ]
    return sum_forward_flops(layers, _logits(cfg))


def expected_kv_groups(heads: int, groups: int, strata: int, keep_per_stratum: int) -> float:
    """Expected key/value groups read when ``keep_per_stratum`` query heads are kept in each stratum."""
    per_group, width = heads // groups, heads // strata
    expected = 0.0
    for group in range(groups):
        empty = 1.0
        for stratum in range(strata):  # the group's heads that fall in this stratum
            inside = len(
                set(range(group * per_group, (group + 1) * per_group))
                & set(range(stratum * width, (stratum + 1) * width))
            )
            empty *= math.comb(width - inside, keep_per_stratum) / math.comb(width, keep_per_stratum)
        expected += 1.0 - empty
    return expected


def expected_forward_flops(cfg: ModelConfig, plan: ESTPlan, rates: StageRates) -> float:
    """Expected forward FLOPs per token of one step of a stage with ``rates``."""
    heads, kv_groups = cfg.num_attention_heads, cfg.num_query_groups
    if rates.p_H < 1.0:
        keep = kept_count(rates.p_H, heads // plan.tensor_strata)
        heads, kv_groups = keep * plan.tensor_strata, expected_kv_groups(heads, kv_groups, plan.tensor_strata, keep)
    hidden = round(rates.p_M * cfg.ffn_hidden_size) if rates.p_M < 1.0 else None
    layers = [
        layer_forward_flops(cfg, layer, heads=heads, kv_groups=kv_groups, hidden=hidden)
        for layer in range(cfg.num_layers)
    ]
    return rates.p_L * sum_forward_flops(layers, 0).total + _logits(cfg)


@dataclass(frozen=True)
class ESTRunFlops:
    """Expected training FLOPs of an EST run beside the same run training the full model every step."""

    stage_steps: tuple[int, int, int]
    stage_flops: tuple[float, float, float]
    full: float

    @property
    def total(self) -> float:
        return sum(self.stage_flops)

    @property
    def saving(self) -> float:
        """1 − EST's training FLOPs / the full model's."""
        return 1.0 - self.total / self.full


def est_run_flops(cfg: ModelConfig, plan: ESTPlan, tokens_per_step: int) -> ESTRunFlops:
    """Expected training FLOPs (3 × forward) of a run under ``plan``, stage by stage."""
    steps = (plan.stage1_steps, plan.stage2_steps - plan.stage1_steps, plan.total_steps - plan.stage2_steps)
    per_token = [expected_forward_flops(cfg, plan, rates) for rates in (plan.stage1, plan.stage2, StageRates(3))]
    scale = TRAINING_FLOPS_PER_FORWARD * tokens_per_step
    flops = tuple(scale * n * f for n, f in zip(steps, per_token))
    return ESTRunFlops(steps, flops, scale * plan.total_steps * per_token[2])
