"""Which checkpoint a launch starts from, and whether it fits the run, decided before any set-up.

Read from the checkpoint's own ``config.yaml`` and schedule record (no
process group, no megatron), so a mismatch fails in the preflight with exit
status 2, before the run directory is touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config.train import TrainConfig
from .checkpoint_dirs import CheckpointDirs
from .checkpointing import CHECKPOINTS_SUBDIR, check_same_model, resolve_checkpoint
from .schedule import resume_schedule


@dataclass(frozen=True)
class StartingPoint:
    checkpoint: Path
    resuming: bool  # True: the run's own latest checkpoint (full state); False: weights of checkpoint.load


def starting_point(config: TrainConfig) -> StartingPoint | None:
    """The checkpoint this launch will start from, or None for a fresh start."""
    if config.checkpoint.resume:
        latest = CheckpointDirs(Path(config.run_dir) / CHECKPOINTS_SUBDIR).latest()
        if latest is not None:
            return StartingPoint(latest, resuming=True)
    if config.checkpoint.load is not None:
        return StartingPoint(resolve_checkpoint(config.checkpoint.load), resuming=False)
    return None


def check_starting_point(config: TrainConfig) -> None:
    """The checkpoint to start from holds this run's model, and a resume agrees on the LR schedule."""
    start = starting_point(config)
    if start is None:
        return
    check_same_model(start.checkpoint, config, allow_attention_swap=not start.resuming)
    if start.resuming:
        resume_schedule(start.checkpoint, config)
