"""Pretrain a GPT with structured feedforward layers on megatron-core.

    python -m megatron_sffn.train CONFIG.yaml [dotted.key=value ...]
    torchrun --nproc_per_node 8 -m megatron_sffn.train CONFIG.yaml parallel.tensor_parallel=2
    python -m megatron_sffn.train CONFIG.yaml --dry-run --world-size 64 --device H100

The data-parallel size is what the world size leaves after tensor x pipeline
parallelism.  Relaunching the same command resumes from the run directory's
latest checkpoint.  Everything that can be checked without process groups
(the configuration, the layout against the world size, the dataset against
the model, a checkpoint to load) is checked first, so a bad launch fails in
seconds with a message naming the key at fault.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from .config.loading import add_config_arguments, load_config
from .config.train import TrainConfig
from .entry_setup import quiet_known_warnings


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_sffn.train",
        description="Pretrain a GPT with structured FFNs (run under torchrun for several processes).",
    )
    add_config_arguments(parser)
    return parser.parse_args(argv)


def preflight(config: TrainConfig, world_size: int, job_id: str | None = None) -> None:
    """The checks that need no process group, in the order a user would fix them.

    ``job_id``: the torchrun run id of the job being launched (see :func:`.training.run_lock.holder_of`).
    """
    from .planning.checks import check_run_config
    from .planning.steps import resolved_train_steps, resolved_warmup_steps
    from .training.data_setup import check_dataset
    from .training.model_setup import check_optimizer_choice
    from .training.resume_checks import check_starting_point
    from .training.run_lock import holder_of, locked_message
    from .training.schedule import check_warmup

    check_run_config(config)
    config.validate_layout(world_size)
    check_warmup(resolved_train_steps(config), resolved_warmup_steps(config))
    check_optimizer_choice(config)
    check_dataset(config)
    check_starting_point(config)
    holder = holder_of(config.run_dir, job_id)
    if holder is not None:
        raise ValueError(locked_message(config.run_dir, holder))


def checked_config(path: str, overrides: Sequence[str], world_size: int) -> TrainConfig:
    """The run's config after every check that needs no process group (raises ValueError / FileNotFoundError)."""
    config = load_config(TrainConfig, path, list(overrides))
    preflight(config, world_size)
    return config


def main(argv: Sequence[str] | None = None) -> int:
    quiet_known_warnings()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--dry-run" in argv:  # plan only; options: python -m megatron_sffn.planning -h
        from .planning.report import main as dry_run_main

        return dry_run_main([arg for arg in argv if arg != "--dry-run"])
    args = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        config = checked_config(args.config, args.overrides, world_size)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2

    from .training.loop import run_training
    from .training.nonfinite import NonFiniteTrainingError
    from .training.run_lock import RunDirLocked
    from .training.signals import EXIT_INTERRUPTED

    try:
        run_training(config)
    except RunDirLocked as exc:  # another job took the run directory between the preflight and now
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except NonFiniteTrainingError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:  # Ctrl-C during set-up, before the loop handles it
        print("[train] interrupted during set-up; nothing was saved", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    finally:
        from .model.distributed import close_process_group

        close_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
