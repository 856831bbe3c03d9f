"""Run named checks inside ``torchrun`` worker processes and collect their results.

Multi-process correctness (TP/PP, dist_checkpointing) can only be tested in
real processes talking over gloo.  Importing megatron-core costs ~6 s per
process, so one launch runs several checks in sequence; each check is a
module-level function of a worker module returning a picklable value.

Test side::

    run = launch("tests.workers.model_parallel", ["pp2_matches_tp1", "ckpt_reshard"], nproc=4)
    run.results[rank]["pp2_matches_tp1"]

Worker side: ``def pp2_matches_tp1(**kwargs) -> Any``.  A check may write
scratch files under :func:`scratch_dir` (shared by all ranks of the launch).
Each rank saves ``{check: result}`` with ``torch.save``; a check that raises
stops that rank, torchrun then stops the others, and :func:`launch` raises
with the failing check's traceback and the tail of the workers' output.

This file is also the per-rank entry point that torchrun runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRATCH_ENV = "SFFN_MP_SCRATCH"
_LOG_TAIL_CHARS = 12000


@dataclass
class Launch:
    """What one torchrun launch produced: per-rank results, its wall time and its output."""

    results: list[dict[str, Any]]
    seconds: float
    log: str


class WorkerFailure(RuntimeError):
    """A launch that failed, timed out or left a rank without results."""


def scratch_dir() -> Path:
    """A directory shared by every rank of the current launch, removed after it."""
    return Path(os.environ[SCRATCH_ENV])


def launch(
    module: str,
    checks: Sequence[str],
    nproc: int,
    *,
    timeout: float = 300.0,
    kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    hide_gpus: bool = True,
) -> Launch:
    """Run ``module.<check>(**kwargs[check])`` for each check, in order, on ``nproc`` gloo ranks.

    ``hide_gpus`` keeps the workers on the CPU path even on a GPU machine, so a
    single-GPU host can still run multi-rank gloo tests.
    """
    if not checks:
        raise ValueError("launch() needs at least one check name")
    spec = {"module": module, "checks": list(checks), "kwargs": {k: dict(v) for k, v in (kwargs or {}).items()}}
    unknown = set(spec["kwargs"]) - set(checks)
    if unknown:
        raise ValueError(f"kwargs given for checks {sorted(unknown)} that are not in checks={list(checks)}")
    with tempfile.TemporaryDirectory(prefix="sffn-mp-") as tmp:
        out = Path(tmp)
        (out / "scratch").mkdir()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env[SCRATCH_ENV] = str(out / "scratch")
        env.setdefault("OMP_NUM_THREADS", "1")
        if hide_gpus:
            env["CUDA_VISIBLE_DEVICES"] = ""
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(Path(__file__).resolve()),
            "--out",
            str(out),
            "--spec",
            json.dumps(spec),
        ]
        log_path = out / "workers.log"
        start = time.monotonic()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT, start_new_session=True
            )
            try:
                returncode = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                returncode = None
        seconds = time.monotonic() - start
        log_text = log_path.read_text(errors="replace")
        label = f"torchrun {module} {list(checks)} x{nproc}"
        print(f"{label}: {seconds:.1f} s", flush=True)
        errors = sorted(out.glob("rank*.error.txt"), key=lambda p: p.stat().st_mtime_ns)  # root cause first
        if returncode != 0 or errors:
            why = f"timed out after {timeout:.0f} s" if returncode is None else f"exit code {returncode}"
            raise WorkerFailure(
                f"{label} failed ({why}).\n"
                + "".join(f"--- {p.name} ---\n{p.read_text()}\n" for p in errors)
                + f"--- last output ---\n{log_text[-_LOG_TAIL_CHARS:]}"
            )
        import torch

        results = []
        for rank in range(nproc):
            path = out / f"rank{rank}.pt"
            if not path.exists():
                raise WorkerFailure(f"{label}: rank {rank} wrote no results.\n{log_text[-_LOG_TAIL_CHARS:]}")
            results.append(torch.load(path, weights_only=False))
        return Launch(results=results, seconds=seconds, log=log_text)


def _atomic_save(obj: Any, path: Path) -> None:
    import torch

    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _worker_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="torchrun entry point of tests/mp_harness.py")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--spec", required=True, help="JSON: module, checks, kwargs")
    args = parser.parse_args(argv)
    spec = json.loads(args.spec)
    rank = int(os.environ["RANK"])
    module = importlib.import_module(spec["module"])
    results: dict[str, Any] = {}
    try:
        for name in spec["checks"]:
            check = getattr(module, name, None)
            if check is None:
                raise AttributeError(f"worker module {spec['module']} has no check named {name!r}")
            started = time.monotonic()
            results[name] = check(**spec["kwargs"].get(name, {}))
            print(f"[rank {rank}] {name}: {time.monotonic() - started:.1f} s", flush=True)
    except BaseException:
        (args.out / f"rank{rank}.error.txt").write_text(f"check {name!r} on rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    _atomic_save(results, args.out / f"rank{rank}.pt")
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
