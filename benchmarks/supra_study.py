"""A small-scale test of SUPRA uptraining ("Linearizing Large Language Models", Mercat et al., 2024) on CPU.

    python benchmarks/supra_study.py                    # 2 seeds, dense and 32% LowRank
    python benchmarks/supra_study.py --seeds 1 --pretrain-steps 40 --uptrain-steps 10 --out runs/supra_smoke

For each seed and FFN (dense, 32% LowRank), through the real trainer and evaluator:

(d) a softmax GPT pretrained for ``--pretrain-steps``;
(a) its validation loss right after the swap to SUPRA attention (new feature maps at init);
(b) after uptraining it as SUPRA for ``--uptrain-steps`` (``checkpoint.load``, all weights train);
(c) the same SUPRA architecture trained from scratch for the same number of steps (tokens).

The paper's claim under test: (b) beats (c) at equal added tokens and
approaches (d).  ``--uptrain-lrs`` lists peak learning rates for (b): the
first is used for every seed, the others only for seed 1 (the small-scale
learning-rate measurement).  Writes ``results.json`` and ``table.md`` under
``--out``; the data is the sgt study's (embedded corpus, 2048-token BPE,
context 128), built on the first run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from sgt_study import (  # noqa: E402  (also puts the repository on sys.path)
    GLOBAL_BATCH,
    LOWRANK32,
    MICRO_BATCH,
    MODEL,
    REPO_ROOT,
    ensure_data,
    run_trainer,
)

FFNS = {"dense": {"structure": "dense"}, "lowrank32": LOWRANK32}
PRETRAIN_LR = 3.0e-3


def log(message: str) -> None:
    print(f"[supra-study] {message}", file=sys.stderr, flush=True)


def _env(trace: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "CUDA_VISIBLE_DEVICES": ""}
    if trace is not None:
        env["SFFN_STEP_TRACE"] = str(trace)
    return env


def _stream(name: str, command: list[str], env: dict[str, str]) -> None:
    proc = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    for line in proc.stdout:
        if line.startswith(("step ", "validation", "[train]", "[evaluate]", "error")):
            print(f"  {name} | {line.rstrip()}", file=sys.stderr, flush=True)
    if proc.wait() != 0:
        raise RuntimeError(f"{name}: {' '.join(command)} failed (exit code {proc.returncode})")


def run_config(
    run_dir: Path,
    data: Path,
    *,
    ffn: str,
    seed: int,
    steps: int,
    lr: float,
    supra: bool,
    load: Path | None,
    eval_interval: int,
) -> dict[str, Any]:
    model: dict[str, Any] = {**MODEL, "ffn": dict(FFNS[ffn])}
    if supra:
        model["attention"] = "supra"
    return {
        "run_dir": str(run_dir),
        "model": model,
        "data": {"path": str(data), "tokenizer": str(data.parent / "tokenizer.json"), "num_workers": 0, "seed": seed},
        "optimizer": {"lr": lr, "warmup_fraction": 0.1},
        "training": {
            "micro_batch_size": MICRO_BATCH,
            "global_batch_size": GLOBAL_BATCH,
            "train_steps": steps,
            "seed": seed,
        },
        "checkpoint": {"save_interval": None, "keep_last": 1, "load": None if load is None else str(load)},
        "logging": {"log_interval": 25, "tensorboard": False},
        "eval": {"interval": eval_interval, "max_batches": None, "at_end": True},
    }


def train(name: str, out: Path, config: dict[str, Any]) -> list[dict]:
    """One trainer run; returns its evaluations (cached: a finished run is not redone)."""
    return run_trainer(name, config, out, flops_at=lambda step: math.nan)  # this study compares at equal tokens


def evaluate_swapped(name: str, out: Path, softmax_run: Path) -> float:
    """(a): validation loss of the softmax checkpoint evaluated as SUPRA (cached)."""
    result = out / "traces" / name / "eval.json"
    if not result.exists():
        log(f"{name}: evaluating {softmax_run} right after the swap to SUPRA")
        _stream(
            name,
            [
                sys.executable,
                "-m",
                "megatron_sffn.evaluate",
                str(softmax_run),
                "model.attention=supra",
                "eval.max_batches=null",
                "--json",
                str(result),
            ],
            _env(),
        )
    return json.loads(result.read_text())["val_loss"]


def study_seed(out: Path, data: Path, ffn: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    runs = out / "runs"
    common = dict(data=data, ffn=ffn, seed=seed, eval_interval=args.eval_interval)
    softmax_dir = runs / f"{ffn}-softmax-seed{seed}"
    softmax = train(
        f"{ffn}-softmax-seed{seed}",
        out,
        run_config(softmax_dir, steps=args.pretrain_steps, lr=PRETRAIN_LR, supra=False, load=None, **common),
    )
    row: dict[str, Any] = {
        "softmax": softmax[-1]["val_loss"],
        "swapped": evaluate_swapped(f"{ffn}-swapped-seed{seed}", out, softmax_dir),
    }
    lrs = args.uptrain_lrs if seed == 1 else args.uptrain_lrs[:1]
    for lr in lrs:
        name = f"{ffn}-uptrain-lr{lr:g}-seed{seed}"
        evals = train(
            name, out, run_config(runs / name, steps=args.uptrain_steps, lr=lr, supra=True, load=softmax_dir, **common)
        )
        row[f"uptrained_lr{lr:g}"] = evals[-1]["val_loss"]
    scratch = train(
        f"{ffn}-scratch-seed{seed}",
        out,
        run_config(
            runs / f"{ffn}-scratch-seed{seed}",
            steps=args.uptrain_steps,
            lr=PRETRAIN_LR,
            supra=True,
            load=None,
            **common,
        ),
    )
    row["scratch"] = scratch[-1]["val_loss"]
    return row


def table(results: dict[str, dict[int, dict[str, float]]], args: argparse.Namespace) -> str:
    main_lr = f"uptrained_lr{args.uptrain_lrs[0]:g}"
    arms = [
        ("(d) softmax original", "softmax"),
        ("(a) right after the swap", "swapped"),
        (f"(b) uptrained {args.uptrain_steps} steps, lr {args.uptrain_lrs[0]:g}", main_lr),
        (f"(c) SUPRA from scratch, {args.uptrain_steps} steps", "scratch"),
    ]
    lines = ["| FFN | arm | val loss per seed | val PPL mean |", "|---|---|---|---|"]
    for ffn, by_seed in results.items():
        for label, key in arms:
            losses = [row[key] for _, row in sorted(by_seed.items())]
            ppl = statistics.fmean(math.exp(x) for x in losses)
            lines.append(f"| {ffn} | {label} | {', '.join(f'{x:.3f}' for x in losses)} | {ppl:.1f} |")
        for lr in args.uptrain_lrs[1:]:
            loss = by_seed[1][f"uptrained_lr{lr:g}"]
            lines.append(f"| {ffn} | (b) uptrained, lr {lr:g} (seed 1) | {loss:.3f} | {math.exp(loss):.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "supra_study")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--uptrain-steps", type=int, default=100)
    parser.add_argument("--uptrain-lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    parser.add_argument("--eval-interval", type=int, default=1000)
    parser.add_argument("--ffns", nargs="+", choices=list(FFNS), default=list(FFNS))
    parser.add_argument("--only-seed", type=int, help="run this seed only (several processes can share --out)")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.uptrain_steps < 10 or args.pretrain_steps < 10:
        parser.error("--seeds must be >= 1 and the step counts >= 10 (10% warmup)")
    out = args.out.resolve()
    data = ensure_data(out)
    seeds = [args.only_seed] if args.only_seed else range(1, args.seeds + 1)
    results = {ffn: {seed: study_seed(out, data, ffn, seed, args) for seed in seeds} for ffn in args.ffns}
    if args.only_seed:
        log(f"seed {args.only_seed} done; run without --only-seed for the table")
        return 0
    (out / "results.json").write_text(
        json.dumps({"args": vars(args) | {"out": str(out)}, "results": results}, indent=2)
    )
    text = table(results, args)
    (out / "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
