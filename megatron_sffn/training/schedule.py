"""Learning-rate schedule: linear warmup, then cosine (or linear / constant) decay to ``min_lr_ratio * lr``.

megatron-core's ``OptimizerParamScheduler`` does the arithmetic.  The loop
advances it once per training step *before* the update, so update ``k``
(1-based) uses ``lr(k)``: the first update already has a non-zero rate, the
peak is reached at ``k = warmup`` and the minimum at the last step.  Steps
skipped for a non-finite loss still advance the schedule, so a run always
ends on its planned rate; the scheduler's ``num_steps`` therefore always
equals the trainer's step counter, which is what a resumed run relies on.
"""

from __future__ import annotations

from ..config.train import OptimizerConfig


def check_warmup(train_steps: int, warmup_steps: int) -> None:
    """The schedule needs at least one step after warmup (megatron asserts it; this names the keys)."""
    if train_steps < 1:
        raise ValueError(f"train_steps={train_steps} must be >= 1")
    if not 0 <= warmup_steps < train_steps:
        raise ValueError(
            f"optimizer warmup of {warmup_steps} steps must be shorter than the run's {train_steps} steps "
            f"(optimizer.warmup_steps / optimizer.warmup_fraction against training.train_steps / train_tokens)"
        )


def build_lr_scheduler(optimizer, opt_cfg: OptimizerConfig, train_steps: int, warmup_steps: int):
    """megatron's ``OptimizerParamScheduler`` for a run of ``train_steps`` updates.

    Weight decay is constant (megatron's optimizer already exempts biases and
    norm parameters from it).
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    check_warmup(train_steps, warmup_steps)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=opt_cfg.lr,
        min_lr=opt_cfg.lr * opt_cfg.min_lr_ratio,
        lr_warmup_steps=warmup_steps,
        lr_decay_steps=train_steps,
        lr_decay_style=opt_cfg.decay_style,
        start_wd=opt_cfg.weight_decay,
        end_wd=opt_cfg.weight_decay,
        wd_incr_steps=train_steps,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
