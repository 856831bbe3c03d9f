#!/usr/bin/env python3
"""Write a ready-to-submit SLURM job from launch/slurm.sbatch for a given size, queue and run.

    launch/render_slurm.py --nodes 4 --gpus-per-node 8 --partition gpu --time 12:00:00 \\
        configs/paper/m_lowrank32.yaml training.micro_batch_size=8 --out jobs/m_lowrank32.sbatch
    sbatch jobs/m_lowrank32.sbatch

The rendered job carries its config and overrides, the repository path and
the directory it was rendered in (where relative paths in the config point),
so it can be submitted from anywhere and resubmitted unchanged to resume.
Only the standard library is used, so any Python 3.9+ on a login node runs it.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path

LAUNCH_DIR = Path(__file__).resolve().parent
TEMPLATE = LAUNCH_DIR / "slurm.sbatch"
MARKER = "# -- rendered settings --"
# Command-line option -> #SBATCH option; None values are left as the template has them.
DIRECTIVES = ("nodes", "gpus-per-node", "cpus-per-task", "time", "job-name", "partition", "account", "output")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def set_directive(lines: list[str], name: str, value: str) -> list[str]:
    """Replace ``#SBATCH --name=...`` or add it after the last ``#SBATCH`` line (sbatch reads them only there)."""
    pattern = re.compile(rf"^#SBATCH\s+--{re.escape(name)}(=|\s|$)")
    line = f"#SBATCH --{name}={value}"
    found = [i for i, text in enumerate(lines) if pattern.match(text)]
    if found:
        return [line if i == found[0] else text for i, text in enumerate(lines) if i not in found[1:]]
    last = max(i for i, text in enumerate(lines) if text.startswith("#SBATCH"))
    return lines[: last + 1] + [line] + lines[last + 1 :]


def render(template: str, directives: dict[str, str], job_args: list[str], workdir: Path, root: Path) -> str:
    """The template with ``directives`` set and the run's arguments, repository and directory filled in."""
    lines = template.splitlines()
    if MARKER not in lines:
        raise ValueError(f"{TEMPLATE}: the line {MARKER!r} that marks where settings go is missing")
    for name, value in directives.items():
        lines = set_directive(lines, name, value)
    at = lines.index(MARKER) + 1
    settings = [
        f"# rendered by launch/render_slurm.py for: {shlex.join(job_args)}",
        f"export SFFN_ROOT={shlex.quote(str(root))}",
        f"cd {shlex.quote(str(workdir))}",
        f'if [ "$#" -eq 0 ]; then set -- {shlex.join(job_args)}; fi',
    ]
    return "\n".join(lines[:at] + settings + lines[at:]) + "\n"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.chmod(0o755)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launch/render_slurm.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="run configuration (YAML), relative to the current directory or absolute")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides for the trainer")
    parser.add_argument("--nodes", type=_positive, required=True)
    parser.add_argument("--gpus-per-node", type=_positive, default=None)
    parser.add_argument(
        "--cpus-per-task", type=_positive, default=None, help="CPUs of each node's torchrun and its workers"
    )
    parser.add_argument("--time", default=None, help="time limit, e.g. 12:00:00")
    parser.add_argument("--job-name", default=None)
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--output", default=None, help="SLURM's log file pattern, e.g. logs/%%x-%%j.out")
    parser.add_argument("--out", type=Path, default=None, help="write the job here (default: standard output)")
    args = parser.parse_intermixed_args(argv)

    if not Path(args.config).is_file():
        print(f"render_slurm: error: config file {args.config} not found", file=sys.stderr)
        return 2
    directives = {name: str(getattr(args, name.replace("-", "_"))) for name in DIRECTIVES}
    directives = {name: value for name, value in directives.items() if value != "None"}
    text = render(
        TEMPLATE.read_text(encoding="utf-8"),
        directives,
        [args.config, *args.overrides],
        workdir=Path.cwd(),
        root=LAUNCH_DIR.parent,
    )
    if args.out is None:
        sys.stdout.write(text)
    else:
        write_atomic(args.out, text)
        print(f"render_slurm: wrote {args.out} ({args.nodes} node(s)); submit with: sbatch {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
