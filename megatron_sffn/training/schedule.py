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

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..atomic_io import write_text_atomic
from ..config.loading import from_dict
from ..config.train import OptimizerConfig, TrainConfig
from ..planning.steps import resolved_train_steps, resolved_warmup_steps
from .checkpoint_dirs import step_of


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


SCHEDULE_FILE = "lr_schedule.json"  # in every checkpoint directory, beside config.yaml


@dataclass(frozen=True)
class LRSchedule:
    """The learning-rate schedule a run follows, as recorded in its checkpoints.

    A resume must follow the schedule it was saved with, or be told what to
    do instead (``training.schedule_on_resume``): silently re-stretching it
    over a new length makes the rate jump at the resumed step.
    """

    lr: float
    min_lr_ratio: float
    decay_style: str
    warmup_steps: int
    train_steps: int

    @classmethod
    def of(cls, config: TrainConfig) -> "LRSchedule":
        opt = config.optimizer
        return cls(
            opt.lr, opt.min_lr_ratio, opt.decay_style, resolved_warmup_steps(config), resolved_train_steps(config)
        )

    @classmethod
    def saved_in(cls, checkpoint: Path) -> "LRSchedule":
        """The schedule ``checkpoint`` was trained with (older checkpoints: derived from their config.yaml)."""
        record = checkpoint / SCHEDULE_FILE
        if record.exists():
            return cls(**json.loads(record.read_text(encoding="utf-8")))
        saved = yaml.safe_load((checkpoint / "config.yaml").read_text(encoding="utf-8"))
        return cls.of(from_dict(TrainConfig, saved, str(checkpoint / "config.yaml")))

    def write(self, checkpoint: Path) -> None:
        write_text_atomic(checkpoint / SCHEDULE_FILE, json.dumps(dataclasses.asdict(self)) + "\n")

    def differences(self, other: "LRSchedule") -> list[str]:
        return [
            f"{f.name}: checkpoint {getattr(self, f.name)!r}, this run {getattr(other, f.name)!r}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]

    def build(self, optimizer, opt_cfg: OptimizerConfig):
        """megatron's scheduler for this schedule (weight decay and the rest from ``opt_cfg``)."""
        opt_cfg = dataclasses.replace(opt_cfg, lr=self.lr, min_lr_ratio=self.min_lr_ratio, decay_style=self.decay_style)
        return build_lr_scheduler(optimizer, opt_cfg, self.train_steps, self.warmup_steps)

    def lr_of_update(self, step: int) -> float:
        """The rate update ``step`` (1-based) gets, by megatron's own arithmetic."""

        class _Groups:
            param_groups = [{"params": []}]

        optimizer = _Groups()
        scheduler = self.build(optimizer, OptimizerConfig())
        scheduler.step(increment=step)
        return optimizer.param_groups[0]["lr"]


def resume_schedule(checkpoint: Path, config: TrainConfig) -> LRSchedule:
    """The schedule a launch resuming ``checkpoint`` follows; refuses an unannounced change.

    ``training.schedule_on_resume``: ``keep`` continues the checkpoint's
    schedule (steps past its end run at its final rate), ``refit`` follows
    this run's schedule from the resumed step on.
    """
    saved, wanted = LRSchedule.saved_in(checkpoint), LRSchedule.of(config)
    choice = config.training.schedule_on_resume
    step = step_of(checkpoint.name)
    if saved == wanted or choice == "refit" or (step is not None and step >= wanted.train_steps):
        return wanted  # (the last case trains nothing: the run is already complete)
    if choice == "keep":
        return saved
    jump = ""
    if step is not None and saved.lr_of_update(step + 1) != wanted.lr_of_update(step + 1):
        jump = (
            f"; at update {step + 1} the rate would jump from {saved.lr_of_update(step + 1):.3g} (the "
            f"checkpoint's schedule) to {wanted.lr_of_update(step + 1):.3g}"
        )
    raise ValueError(
        f"{checkpoint} was trained with another learning-rate schedule than this run's: "
        + "; ".join(saved.differences(wanted))
        + jump
        + ". Set training.schedule_on_resume=keep to continue the checkpoint's schedule (steps past its end run "
        "at its final rate) or training.schedule_on_resume=refit to follow this run's schedule from the resumed step"
    )
