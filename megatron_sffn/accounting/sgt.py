"""Step counts and training FLOPs of self-guided training (SGT), and the same-FLOPs ratio.

Two modes (``sgt.mode`` of a run):

``fixed_steps``
    The run keeps its S steps; the guided phase is ``guided_fraction`` of
    them (default 0.5) and the guides' compute comes on top.
``same_flops``
    The paper's headline comparison ("Building on Efficient Foundations",
    Wei et al., 2024): the structured model trains S + g steps, g = ratio × S,
    so that its training FLOPs *including the guides* equal the dense model's
    over S steps; the last g steps re-read the guided phase's data and the LR
    schedule spans all S + g steps.  By default the guided phase lasts g steps,
    the accounting behind the paper's ratios: with the guides' expected cost
    of 0.5 × T steps of dense FFN compute (cost-saving variant), solving
    ``F_s (S + g) + 0.5 g G = F_d S`` reproduces the published ratios (32%:
    LowRank and BlockShuffle 0.30 / 0.38 / 0.41 / 0.43 for s / m / l / xl,
    BlockDense 0.30 / 0.40 / 0.41 / 0.45) to within 0.5% of the dense FLOPs,
    whereas a guided phase of half the run would not.

``F`` are forward FLOPs per token by the paper's formula and ``G`` the
forward FLOPs per token of dense guides on every structured FFN layer; all
are trained at 3× forward.  The continuous solution uses ``c·T`` guided
steps (c = 0.5 with the cost-saving variant, 1 without); the FLOPs of a
concrete run use the exact expectation ``Σ_{t<T} α(t)``.

Against the paper's code (CLAIRE-Labo/StructuredFFN): step counts are
floored as it floors them (``int(max_step * ratio)`` for g and T), so every
shipped run has the paper's step count.  The guides' cost of a concrete run
is *not* the paper's rounded "0.5 × T": update ``t + 1`` runs with α(t), the
paper's code included (its layers start at α = 1 and advance α after each
backward), so the expected number of dense-branch steps it executes is
``Σ_{t<T} α(t) = (T + 1) / 2``.  That exact figure is reported; the ratio is
solved with the paper's 0.5 × T, which differs from it by half a step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config.model import ModelConfig
from ..structured.guided import expected_guide_steps
from .model import TRAINING_FLOPS_PER_FORWARD, dense_counterpart, forward_flops_per_token, guide_ffn_flops_per_token

MODES = ("fixed_steps", "same_flops")
DEFAULT_GUIDED_FRACTION = 0.5


@dataclass(frozen=True)
class SGTSteps:
    """The step counts of one SGT run."""

    base_steps: int  # S: the run's own length (the dense budget in same-FLOPs mode)
    extra_steps: int  # g: appended steps that re-read the guided phase's data (0 in fixed-steps mode)
    guided_steps: int  # T: updates 1..T run with guides

    @property
    def total_steps(self) -> int:
        return self.base_steps + self.extra_steps


@dataclass(frozen=True)
class SGTRunFlops:
    """Training FLOPs of an SGT run beside the dense model's over the base steps."""

    steps: SGTSteps
    expected_guide_steps: float
    model: float  # the structured model over S + g steps
    guides: float  # the guides' expected compute
    dense: float  # the dense model over S steps

    @property
    def total(self) -> float:
        return self.model + self.guides

    @property
    def vs_dense(self) -> float:
        """Total over dense training FLOPs (1.0 = same FLOPs)."""
        return self.total / self.dense


def _require_structured(cfg: ModelConfig) -> None:
    if cfg.ffn.structure == "dense":
        raise ValueError("self-guided training needs structured FFNs; model.ffn.structure is 'dense'")


def _require_fraction(guided_fraction: float | None) -> None:
    if guided_fraction is not None and not 0.0 < guided_fraction <= 1.0:
        raise ValueError(f"sgt.guided_fraction={guided_fraction} must be in (0, 1]")


def same_flops_ratio(cfg: ModelConfig, *, guided_fraction: float | None = None, stochastic: bool = True) -> float:
    """The ratio g / S at which SGT's training FLOPs equal the dense model's over S steps.

    ``guided_fraction`` None: the guided phase lasts g steps (the paper's
    accounting); otherwise it is that fraction of all S + g steps.
    """
    _require_structured(cfg)
    _require_fraction(guided_fraction)
    structured = forward_flops_per_token(cfg).total
    dense = forward_flops_per_token(dense_counterpart(cfg)).total
    guides = (0.5 if stochastic else 1.0) * guide_ffn_flops_per_token(cfg)
    if guided_fraction is None:
        ratio = (dense - structured) / (structured + guides)
    else:
        ratio = dense / (structured + guided_fraction * guides) - 1.0
    if ratio <= 0.0:
        raise ValueError(
            f"self-guided training of this {cfg.ffn.structure} model costs at least the dense model's FLOPs per step "
            f"(guided_fraction={guided_fraction}, stochastic={stochastic}); no same-FLOPs run exists"
        )
    return ratio


def _whole_steps(steps: float) -> int:
    """Fractional step counts round down, as the paper's code does (``int(max_step * ratio)``)."""
    return math.floor(steps)


def sgt_steps(
    cfg: ModelConfig,
    base_steps: int,
    *,
    mode: str = "same_flops",
    ratio: float | None = None,
    guided_fraction: float | None = None,
    stochastic: bool = True,
) -> SGTSteps:
    """S, g and T of a run of ``base_steps`` in ``mode``; ``ratio`` None solves the same-FLOPs ratio."""
    _require_structured(cfg)
    _require_fraction(guided_fraction)
    if mode not in MODES:
        raise ValueError(f"sgt.mode={mode!r}; expected one of {', '.join(MODES)}")
    if base_steps < 1:
        raise ValueError(f"base_steps={base_steps} must be >= 1")
    if mode == "fixed_steps":
        if ratio is not None:
            raise ValueError(f"sgt.ratio={ratio} applies to sgt.mode='same_flops' only")
        fraction = DEFAULT_GUIDED_FRACTION if guided_fraction is None else guided_fraction
        return SGTSteps(base_steps, 0, max(1, _whole_steps(fraction * base_steps)))
    if ratio is None:
        ratio = same_flops_ratio(cfg, guided_fraction=guided_fraction, stochastic=stochastic)
    elif ratio <= 0.0:
        raise ValueError(f"sgt.ratio={ratio} must be positive")
    extra = _whole_steps(ratio * base_steps)
    total = base_steps + extra
    guided = extra if guided_fraction is None else _whole_steps(guided_fraction * total)
    return SGTSteps(base_steps, extra, max(1, min(guided, total)))


def sgt_run_flops(
    cfg: ModelConfig, steps: SGTSteps, tokens_per_step: int, *, schedule: str = "cosine", stochastic: bool = True
) -> SGTRunFlops:
    """Training FLOPs of the run ``steps`` with the guides' exact expected cost under ``schedule``."""
    _require_structured(cfg)
    expected = expected_guide_steps(steps.guided_steps, schedule, stochastic=stochastic)
    per_step = TRAINING_FLOPS_PER_FORWARD * tokens_per_step
    return SGTRunFlops(
        steps=steps,
        expected_guide_steps=expected,
        model=per_step * forward_flops_per_token(cfg).total * steps.total_steps,
        guides=per_step * guide_ffn_flops_per_token(cfg) * expected,
        dense=per_step * forward_flops_per_token(dense_counterpart(cfg)).total * steps.base_steps,
    )
