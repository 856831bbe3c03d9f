"""Print the run directory of a config plus overrides (the launch scripts put the logs there).

    python launch/resolve_run_dir.py CONFIG.yaml [dotted.key=value ...]

Loading the config is also the launch's first check: an unknown key or a
malformed override fails here, before torchrun starts any process.
"""

from __future__ import annotations

import sys

from megatron_sffn.config.loading import load_config
from megatron_sffn.config.train import TrainConfig


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: resolve_run_dir.py CONFIG.yaml [dotted.key=value ...]", file=sys.stderr)
        return 2
    try:
        config = load_config(TrainConfig, argv[0], argv[1:])
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(config.run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
