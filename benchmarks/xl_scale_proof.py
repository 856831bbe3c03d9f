"""Scale proof: a few real training steps of the 744M-parameter 32% LowRank Transformer-xl on this CPU.

    python benchmarks/xl_scale_proof.py                  # 3 steps at TP=2, full recomputation
    python benchmarks/xl_scale_proof.py --json out.json --keep

Runs ``configs/paper/xl_lowrank32.yaml`` unchanged in architecture (24 layers,
d 2048, LowRank R=512 FFNs, vocabulary 32000, sequence 1024) through
``launch/single_node.sh`` with two gloo workers at tensor parallelism 2:
micro-batch 1, global batch 1, fp32, full activation recomputation, on a
synthetic prepared dataset of the model's vocabulary and context (no
download).  The LowRank factors start from a normal draw by default
(``--init svd`` for the paper's init, which costs 46 full 2048 x 8192 SVDs
per rank before the first step on a CPU): the shapes, memory and step cost
are the same.  Recorded per step: the loss (the trainer's step trace), the step
time (the trainer's console line; evaluation and the checkpoint save are not
in it); per rank: the peak resident set (``VmHWM`` polled from ``/proc``).
Beside them, the dry run's per-process estimate of the same launch, and its
prediction for dense xl at the same layout.  The machine is shared: the load
average is printed before and after.  The run directory (a 9 GB checkpoint)
is removed unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from megatron_sffn.config.loading import load_config  # noqa: E402
from megatron_sffn.config.train import TrainConfig  # noqa: E402
from megatron_sffn.entry_setup import quiet_known_warnings  # noqa: E402
from megatron_sffn.train import ENV_STEP_TRACE  # noqa: E402
from megatron_sffn.training.trace import read_trace  # noqa: E402
from tests.workers.train_checks import write_dataset  # noqa: E402

CONFIG = REPO_ROOT / "configs" / "paper" / "xl_lowrank32.yaml"
DENSE = REPO_ROOT / "configs" / "paper" / "xl_dense.yaml"
_GIB = 1024**3
_STEP_LINE = re.compile(r"step (\d+)/\d+ \| loss [^|]+\|.*\| ([\d.]+) (ms|s)/step \|")


def log(message: str) -> None:
    print(f"[xl_scale_proof] {message}", file=sys.stderr, flush=True)


def overrides(run_dir: Path, data: Path, steps: int, tp: int, recompute: str, init: str) -> list[str]:
    chosen = [
        f"run_dir={run_dir}",
        f"data.path={data}",
        "data.num_workers=0",
        f"parallel.tensor_parallel={tp}",
        "training.micro_batch_size=1",
        "training.global_batch_size=1",
        f"training.train_steps={steps}",
        "training.train_tokens=null",
        "optimizer.warmup_steps=1",
        "optimizer.warmup_fraction=null",
        "eval.interval=null",
        "eval.at_end=false",
        "checkpoint.save_interval=null",
        "logging.log_interval=1",
        "logging.tensorboard=false",
        f"model.ffn.init={init}",
    ]
    if recompute == "full":
        chosen += [
            "training.recompute_granularity=full",
            "training.recompute_method=uniform",
            "training.recompute_num_layers=1",
        ]
    return chosen


def dry_run_estimate(config_path: Path, args: list[str], world_size: int) -> dict:
    """Per-process memory the dry run predicts for this launch (tensor bytes, CPU, fp32)."""
    from megatron_sffn.planning.plan import plan_run

    cfg = load_config(TrainConfig, config_path, [*args, "logging.peak_tflops_per_device=1"])
    plan = plan_run(cfg, world_size, device="cpu", processes_per_node=world_size)
    peak = plan.peak_stage
    return {
        "config": config_path.name,
        "params_per_rank": peak.params,
        "weights_gib": peak.weights / _GIB,
        "grads_gib": peak.gradients / _GIB,
        "optimizer_gib": peak.optimizer / _GIB,
        "activations_gib": (peak.in_flight * peak.activations_per_micro_batch + peak.output_and_loss) / _GIB,
        "total_gib": peak.total / _GIB,
        "device_memory_gib": plan.device.memory_bytes / _GIB,
        "problems": list(plan.problems),
        "notes": list(plan.notes),
    }


def _peak_rss_of_workers(launcher: subprocess.Popen, peaks: dict[int, int]) -> None:
    import psutil

    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if "megatron_sffn.train" not in " ".join(child.cmdline()) or "run_torchrun" in " ".join(child.cmdline()):
                continue
            rank = int(child.environ()["RANK"])
            status = Path(f"/proc/{child.pid}/status").read_text()
            hwm = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
            peaks[rank] = max(peaks.get(rank, 0), hwm)
        except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, FileNotFoundError, AttributeError):
            continue


def run(steps: int, tp: int, recompute: str, init: str, keep: bool) -> dict:
    work = Path(tempfile.mkdtemp(prefix="xl-scale-"))
    try:
        cfg = load_config(TrainConfig, CONFIG, ["data.path=unused"])
        log(f"writing a synthetic dataset: vocab {cfg.model.vocab_size}, context {cfg.model.seq_length}")
        data = write_dataset(
            work / "data",
            train_samples=16,
            val_samples=2,
            per_shard=16,
            seq=cfg.model.seq_length,
            vocab=cfg.model.vocab_size,
        )
        run_dir, trace = work / "run", work / "trace"
        args = overrides(run_dir, data, steps, tp, recompute, init)
        estimate = dry_run_estimate(CONFIG, args, tp)
        dense = dry_run_estimate(DENSE, args, tp)
        env = {
            **os.environ,
            "NPROC": str(tp),
            "CUDA_VISIBLE_DEVICES": "",
            ENV_STEP_TRACE: str(trace),
            "SFFN_PYTHON": sys.executable,
        }
        load_before = Path("/proc/loadavg").read_text().split()[:3]
        log(f"training {steps} steps at TP={tp} (load average {' '.join(load_before)})")
        started = time.monotonic()
        peaks: dict[int, int] = {}
        output = work / "launch.log"
        with open(output, "w", encoding="utf-8") as out:
            proc = subprocess.Popen(
                ["bash", str(REPO_ROOT / "launch" / "single_node.sh"), str(CONFIG), *args],
                cwd=REPO_ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            while proc.poll() is None:
                _peak_rss_of_workers(proc, peaks)
                time.sleep(1.0)
        wall = time.monotonic() - started
        text = output.read_text(errors="replace")
        if proc.returncode != 0:
            raise SystemExit(f"the launch failed (exit {proc.returncode}):\n{text[-6000:]}")
        step_seconds = {
            int(m.group(1)): float(m.group(2)) / (1e3 if m.group(3) == "ms" else 1.0) for m in _STEP_LINE.finditer(text)
        }
        losses = {r["step"]: r["loss"] for r in read_trace(trace / "rank0.jsonl") if "step" in r}
        return {
            "config": CONFIG.relative_to(REPO_ROOT).as_posix(),
            "layout": {
                "tensor_parallel": tp,
                "processes": tp,
                "micro_batch": 1,
                "global_batch": 1,
                "seq_length": cfg.model.seq_length,
                "recompute": recompute,
                "precision": "fp32",
                "ffn_init": init,
            },
            "losses": losses,
            "step_seconds": step_seconds,
            "peak_rss_gib_per_rank": {rank: peaks[rank] / _GIB for rank in sorted(peaks)},
            "estimate": estimate,
            "dense_estimate": dense,
            "wall_seconds": wall,
            "load_average_before": load_before,
            "load_average_after": Path("/proc/loadavg").read_text().split()[:3],
            "cores": os.cpu_count(),
        }
    finally:
        if keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def report(result: dict) -> str:
    est, dense = result["estimate"], result["dense_estimate"]
    lines = [
        f"{result['config']} at TP={result['layout']['tensor_parallel']} on {result['cores']} CPU cores "
        f"(seq {result['layout']['seq_length']}, micro-batch 1, global batch 1, fp32, recompute "
        f"{result['layout']['recompute']}, FFN init {result['layout']['ffn_init']}); "
        f"load average {' '.join(result['load_average_before'])} before, "
        f"{' '.join(result['load_average_after'])} after; wall {result['wall_seconds']:.0f} s",
        "",
        "| step | loss | step time (s) |",
        "|---|---|---|",
    ]
    for step in sorted(result["losses"]):
        seconds = result["step_seconds"].get(step)
        lines.append(
            f"| {step} | {result['losses'][step]:.4f} | {seconds:.1f} |"
            if seconds is not None
            else f"| {step} | {result['losses'][step]:.4f} | n/a |"
        )
    lines += ["", "| rank | peak RSS (GiB) | dry-run estimate (GiB) | measured / estimate |", "|---|---|---|---|"]
    for rank, gib in result["peak_rss_gib_per_rank"].items():
        lines.append(f"| {rank} | {gib:.2f} | {est['total_gib']:.2f} | {gib / est['total_gib']:.2f} |")
    lines += [
        "",
        f"dry-run estimate per process: weights {est['weights_gib']:.2f} + grads {est['grads_gib']:.2f} + "
        f"optimizer {est['optimizer_gib']:.2f} + activations {est['activations_gib']:.2f} = "
        f"{est['total_gib']:.2f} GiB ({est['params_per_rank'] / 1e6:.0f}M parameters per rank)",
        f"dense xl, same layout: {dense['total_gib']:.2f} GiB per process x {result['layout']['processes']} = "
        f"{dense['total_gib'] * result['layout']['processes']:.1f} GiB ({dense['params_per_rank'] / 1e6:.0f}M "
        f"parameters per rank; weights {dense['weights_gib']:.2f} + grads {dense['grads_gib']:.2f} + optimizer "
        f"{dense['optimizer_gib']:.2f} + activations {dense['activations_gib']:.2f})",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tensor-parallel", type=int, default=2)
    parser.add_argument("--recompute", choices=["full", "none"], default="full")
    parser.add_argument(
        "--init",
        choices=["svd", "normal"],
        default="normal",
        help="LowRank factor init: the paper's svd costs ~46 full 2048x8192 SVDs per rank on the CPU; "
        "normal builds the same shapes in seconds (default)",
    )
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument("--keep", action="store_true", help="keep the run directory and dataset")
    args = parser.parse_args(argv)
    quiet_known_warnings()
    result = run(args.steps, args.tensor_parallel, args.recompute, args.init, args.keep)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(report(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
