"""The launch scripts' first step: check the launch once, before torchrun starts, and print its run directory.

    python launch/preflight.py --world-size N CONFIG.yaml [dotted.key=value ...]

Runs the trainer's own preflight (config keys, the layout at this world
size, dataset, the checkpoint to start from, the run directory's lock).  An
error exits 2 here, once: inside torchrun it would fail every worker and use
up every ``MAX_RESTARTS`` restart on a launch that cannot work.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from megatron_sffn.config.loading import add_config_arguments, load_config
from megatron_sffn.config.train import TrainConfig
from megatron_sffn.entry_setup import quiet_known_warnings
from megatron_sffn.train import debug_overrides, preflight


def main(argv: list[str]) -> int:
    quiet_known_warnings()
    parser = argparse.ArgumentParser(prog="launch/preflight.py", description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, required=True, help="processes of the launch (all nodes)")
    parser.add_argument(
        "--job-id",
        help="multi-node: the rendezvous id ('' for the default, sffn-<run_dir name>); printed on a second line",
    )
    add_config_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    try:
        config = load_config(TrainConfig, args.config, [*debug_overrides(os.environ), *args.overrides])
        job_id = None if args.job_id is None else (args.job_id or f"sffn-{Path(config.run_dir).name}")
        preflight(config, args.world_size, job_id)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(config.run_dir)
    if job_id is not None:
        print(job_id)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
