"""The launch scripts' first step: check the launch once, before torchrun starts, and print its run directory.

    python launch/preflight.py --world-size N CONFIG.yaml [dotted.key=value ...]

Runs the trainer's own preflight (config keys, the layout at this world
size, dataset, the checkpoint to start from, the run directory's lock).  An
error exits 2 here, once: inside torchrun it would fail every worker and use
up every ``MAX_RESTARTS`` restart on a launch that cannot work.
"""

from __future__ import annotations

import argparse
import sys

from megatron_sffn.train import checked_config


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="launch/preflight.py", description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, required=True, help="processes of the launch (all nodes)")
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        config = checked_config(args.config, args.overrides, args.world_size)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(config.run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
