"""A run's length and its step plans where they need the accounting: SGT's steps, the EST draws.

Self-guided training ("Building on Efficient Foundations", Wei et al., 2024)
in ``same_flops`` mode appends steps whose number the FLOP accounting solves,
so the length of a run is known here, above the config, not in it.
"""

from __future__ import annotations

from ..accounting import sgt as sgt_accounting
from ..config.train import TrainConfig
from ..est import ESTPlan, build_plan


def run_sgt_steps(cfg: TrainConfig) -> sgt_accounting.SGTSteps | None:
    """S, g and T of self-guided training (None when ``sgt.enabled`` is false)."""
    sgt = cfg.sgt
    if not sgt.enabled:
        return None
    return sgt_accounting.sgt_steps(
        cfg.model,
        cfg.resolved_base_steps(),
        mode=sgt.mode,
        ratio=sgt.ratio,
        guided_fraction=sgt.guided_fraction,
        stochastic=sgt.stochastic,
    )


def resolved_train_steps(cfg: TrainConfig) -> int:
    """Optimizer steps of the run: the base steps, plus those self-guided training appends (same-FLOPs mode)."""
    steps = run_sgt_steps(cfg)
    return cfg.resolved_base_steps() if steps is None else steps.total_steps


def resolved_warmup_steps(cfg: TrainConfig) -> int:
    """Warmup steps of the run, a fraction of all its steps (SGT's appended ones included) or a count."""
    return cfg.optimizer.resolved_warmup_steps(resolved_train_steps(cfg))


def est_plan(cfg: TrainConfig) -> ESTPlan | None:
    """The run's EST schedule and draws (None when ``est.enabled`` is false)."""
    if not cfg.est.enabled:
        return None
    return build_plan(
        cfg.model,
        cfg.est,
        total_steps=resolved_train_steps(cfg),
        seed=cfg.training.seed,
        tensor_parallel=cfg.parallel.tensor_parallel,
        pipeline_parallel=cfg.parallel.pipeline_parallel,
    )
