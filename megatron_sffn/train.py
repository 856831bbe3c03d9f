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
import json
import os
import sys
from typing import Mapping, Sequence

from .config.loading import ConfigError, add_config_arguments, load_config
from .config.train import TrainConfig
from .entry_setup import quiet_known_warnings, quiet_on_broken_pipe

# The environment variables this command reads; the only place in the trainer that reads any.
ENV_STEP_TRACE = "SFFN_STEP_TRACE"
ENV_NONFINITE_STEPS = "SFFN_FAULT_NONFINITE_STEPS"
ENV_SIGNAL_AT_STEP = "SFFN_FAULT_SIGNAL_AT_STEP"
ENV_PAUSE_IN_SAVE = "SFFN_FAULT_PAUSE_IN_SAVE"
ENV_STOP_RECORD = "SFFN_STOP_RECORD"

_ENVIRONMENT = (
    (f"{ENV_STEP_TRACE}=DIR", "debug.step_trace: one JSON line per step and rank in DIR/rank<R>.jsonl"),
    (f"{ENV_NONFINITE_STEPS}=3,4", "debug.nonfinite_steps: the loss of these steps becomes NaN"),
    (f"{ENV_SIGNAL_AT_STEP}=5[:SIG]", "debug.signal_at_step, debug.signal (SIGTERM): rank 0 signals itself"),
    (f"{ENV_PAUSE_IN_SAVE}=4:30", "debug.pause_in_save_step, _s: sleep between writing and committing"),
    (f"{ENV_STOP_RECORD}=FILE", "each node's local rank 0 records there how the launch ended (launch scripts)"),
    ("WORLD_SIZE, RANK, LOCAL_RANK", "the process layout, as torchrun sets it"),
)
ENVIRONMENT_HELP = "environment variables (the debug ones apply before the command line's overrides):\n" + "".join(
    f"  {name:<36} {meaning}\n" for name, meaning in _ENVIRONMENT
)


def _step_of(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name}: {text!r} is not an integer step") from None


def debug_overrides(env: Mapping[str, str]) -> list[str]:
    """The ``debug.*`` overrides that the environment variables of :data:`ENVIRONMENT_HELP` ask for."""
    overrides = []
    if env.get(ENV_STEP_TRACE):
        overrides.append(f"debug.step_trace={json.dumps(env[ENV_STEP_TRACE])}")  # quoted: any path is a string
    steps = [_step_of(ENV_NONFINITE_STEPS, s.strip()) for s in env.get(ENV_NONFINITE_STEPS, "").split(",") if s.strip()]
    if steps:
        overrides.append(f"debug.nonfinite_steps={steps}")
    spec = env.get(ENV_SIGNAL_AT_STEP, "").strip()
    if spec:
        step, _, name = spec.partition(":")
        overrides.append(f"debug.signal_at_step={_step_of(ENV_SIGNAL_AT_STEP, step)}")
        if name:
            overrides.append(f"debug.signal={name}")
    pause = env.get(ENV_PAUSE_IN_SAVE, "").strip()
    if pause:
        step, _, seconds = pause.partition(":")
        try:
            overrides += [f"debug.pause_in_save_step={int(step)}", f"debug.pause_in_save_s={float(seconds)}"]
        except ValueError:
            raise ConfigError(f"environment variable {ENV_PAUSE_IN_SAVE}={pause!r}: expected STEP:SECONDS") from None
    return overrides


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_sffn.train",
        description="Pretrain a GPT with structured FFNs (run under torchrun for several processes).",
        epilog=ENVIRONMENT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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


@quiet_on_broken_pipe
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--dry-run" in argv:  # plan only; options: python -m megatron_sffn.planning -h
        from .planning.report import main as dry_run_main

        return dry_run_main([arg for arg in argv if arg != "--dry-run"])
    import torch

    quiet_known_warnings(backward_on_gpu=torch.cuda.is_available())  # training runs on CUDA when it is there
    args = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        config = checked_config(args.config, [*debug_overrides(os.environ), *args.overrides], world_size)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2

    from .training.loop import run_training
    from .training.nonfinite import NonFiniteTrainingError
    from .training.run_lock import RunDirLocked
    from .training.signals import EXIT_INTERRUPTED, write_stop_record

    try:
        outcome = run_training(config)
        if os.environ.get(ENV_STOP_RECORD) and os.environ.get("LOCAL_RANK", "0") == "0":  # one per node
            write_stop_record(
                os.environ[ENV_STOP_RECORD], outcome.stopped_by, outcome.progress.step, outcome.checkpoint
            )
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
