"""A small-scale reproduction of self-guided training at equal training FLOPs, on CPU.

    python benchmarks/sgt_study.py                      # 2 seeds, ~1-2 h on 2 busy CPU cores
    python benchmarks/sgt_study.py --seeds 1 --base-steps 60 --out runs/sgt_smoke

"Building on Efficient Foundations" (Wei et al., 2024) compares, at the
training FLOPs of the dense model: the dense model, the 32% LowRank model
trained with self-guided training (S + g steps, the last g re-reading the
guided phase's data), and the same structure trained on more tokens.  This
script runs those (plus the 32% LowRank model at the dense model's step
count) on the embedded corpus with a small GPT, through the real trainer
(``python -m megatron_sffn.train``), for several seeds, and writes

* ``results.json``: every run's per-evaluation validation loss with its
  training FLOPs, and the final validation loss over the full split;
* ``table.md``: final validation loss and perplexity per variant, mean and
  spread over seeds;
* ``loss_vs_flops.png``: validation loss against training FLOPs.

FLOPs follow the paper's formula (``megatron_sffn.accounting``); SGT runs
include the guides' expected cost ``Σ α(t)`` steps of dense FFN compute.  The
data is the embedded corpus re-tokenized with a 2048-token BPE (so that the
FFNs, not the output layer, dominate the small model's FLOPs), packed to 128
tokens; it is built under ``--out`` on the first run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from megatron_sffn.accounting.model import dense_counterpart, forward_flops_per_token, guide_ffn_flops_per_token  # noqa: E402
from megatron_sffn.accounting.sgt import same_flops_ratio, sgt_steps  # noqa: E402
from megatron_sffn.config.model import ModelConfig  # noqa: E402
from megatron_sffn.structured.guided import guide_alpha  # noqa: E402
from megatron_sffn.training.trace import read_trace  # noqa: E402

VOCAB, CONTEXT = 2048, 128
MODEL = dict(
    hidden_size=128, num_layers=4, num_attention_heads=4, ffn_hidden_size=512, vocab_size=VOCAB, seq_length=CONTEXT
)
LOWRANK32 = {"structure": "lowrank", "rank": 32}  # 1.25 R / d = 31.25% of the dense FFN's weights
MICRO_BATCH, GLOBAL_BATCH = 8, 16


def log(message: str) -> None:
    print(f"[sgt-study] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Variant:
    """One run of the comparison: ``steps`` updates in all; ``run_steps`` is the run's own length
    (``training.train_steps``: S for SGT in same-FLOPs mode, which appends its g steps itself)."""

    name: str
    ffn: dict[str, Any]
    steps: int
    run_steps: int
    sgt: dict[str, Any] | None = None

    def model(self) -> ModelConfig:
        return ModelConfig(**MODEL, ffn=dict(self.ffn))


def variants(base_steps: int) -> list[Variant]:
    """The four runs of the comparison; step counts come from the FLOP accounting."""
    structured = ModelConfig(**MODEL, ffn=dict(LOWRANK32))
    sgt = sgt_steps(structured, base_steps, mode="same_flops")
    dense_flops = forward_flops_per_token(dense_counterpart(structured)).total
    more_tokens = round(base_steps * dense_flops / forward_flops_per_token(structured).total)
    return [
        Variant("dense", {"structure": "dense"}, base_steps, base_steps),
        Variant("lowrank32", LOWRANK32, base_steps, base_steps),
        Variant("lowrank32_sgt", LOWRANK32, sgt.total_steps, base_steps, {"enabled": True, "mode": "same_flops"}),
        Variant("lowrank32_more_tokens", LOWRANK32, more_tokens, more_tokens),
    ]


def cumulative_flops(variant: Variant, base_steps: int, step: int) -> float:
    """Training FLOPs after ``step`` updates (guides: expected cost of the updates run so far)."""
    cfg = variant.model()
    tokens = GLOBAL_BATCH * CONTEXT
    flops = 3 * tokens * forward_flops_per_token(cfg).total * step
    if variant.sgt is not None:
        guided = sgt_steps(cfg, base_steps, mode="same_flops").guided_steps
        expected = math.fsum(guide_alpha(t, guided) for t in range(min(step, guided)))
        flops += 3 * tokens * guide_ffn_flops_per_token(cfg) * expected
    return flops


def ensure_data(out: Path) -> Path:
    """The embedded corpus tokenized with a 2048-token BPE and packed to 128 tokens (each built once)."""
    data = out / "data"
    tokenizer, prepared = data / "tokenizer.json", data / "prepared"
    python = sys.executable
    if not any((REPO_ROOT / "data" / "corpus").glob("*.parquet")):
        log("building the embedded corpus in data/corpus (as scripts/quickstart.sh does)")
        subprocess.run([python, "-m", "data_tools.make_corpus", "--out", "data/corpus"], cwd=REPO_ROOT, check=True)
    if not tokenizer.exists():
        log(f"training a {VOCAB}-token BPE tokenizer on the embedded corpus: {tokenizer}")
        subprocess.run(
            [
                python,
                "-m",
                "data_tools.train_tokenizer",
                "data/corpus/*.parquet",
                "--vocab-size",
                str(VOCAB),
                "--out",
                str(tokenizer),
            ],
            cwd=REPO_ROOT,
            check=True,
        )
    if not (prepared / "manifest.json").exists():
        log(f"tokenizing and packing the corpus into {prepared}")
        subprocess.run(
            [
                python,
                "-m",
                "data_tools.prepare",
                "data/corpus/*.parquet",
                "--tokenizer",
                str(tokenizer),
                "--out",
                str(prepared),
                "--context-length",
                str(CONTEXT),
                "--validation-fraction",
                "0.02",
                "--workers",
                "1",
            ],
            cwd=REPO_ROOT,
            check=True,
        )
    return prepared


def run_config(variant: Variant, seed: int, run_dir: Path, data: Path, eval_interval: int) -> dict[str, Any]:
    config: dict[str, Any] = {
        "run_dir": str(run_dir),
        "model": {**MODEL, "ffn": dict(variant.ffn)},
        "data": {"path": str(data), "tokenizer": str(data.parent / "tokenizer.json"), "num_workers": 0, "seed": seed},
        "optimizer": {"lr": 3.0e-3, "warmup_fraction": 0.1},
        "training": {
            "micro_batch_size": MICRO_BATCH,
            "global_batch_size": GLOBAL_BATCH,
            "train_steps": variant.run_steps,
            "seed": seed,
        },
        "checkpoint": {"save_interval": None, "keep_last": 1},
        "logging": {"log_interval": 25, "tensorboard": False},
        "eval": {"interval": eval_interval, "max_batches": None, "at_end": True},
    }
    if variant.sgt is not None:
        config["sgt"] = dict(variant.sgt)
    return config


def train(variant: Variant, seed: int, base_steps: int, out: Path, data: Path, eval_interval: int) -> list[dict]:
    """One run through the trainer; returns its evaluation records (cached: a finished run is not redone)."""
    name = f"{variant.name}-seed{seed}"
    config = run_config(variant, seed, out / "runs" / name, data, eval_interval)
    return run_trainer(name, config, out, lambda step: cumulative_flops(variant, base_steps, step))


def run_trainer(name: str, config: dict[str, Any], out: Path, flops_at: Callable[[int], float]) -> list[dict]:
    """Train ``config`` as run ``name``; its evaluations with the training FLOPs after them (``flops_at(step)``).

    Cached: a finished run is not redone.
    """
    run_dir, trace = Path(config["run_dir"]), out / "traces" / name
    done = trace / "done.json"
    if done.exists():
        log(f"{name}: cached")
        return json.loads(done.read_text())
    path = out / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    for stale in (run_dir, trace):
        shutil.rmtree(stale, ignore_errors=True)  # a run interrupted earlier starts over
    env = {**os.environ, "SFFN_STEP_TRACE": str(trace), "PYTHONPATH": str(REPO_ROOT), "CUDA_VISIBLE_DEVICES": ""}
    log(f"{name}: {config['training']['train_steps']} steps")
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "megatron_sffn.train", str(path)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:
        if line.startswith(("step ", "validation", "[train]")):
            print(f"  {name} | {line.rstrip()}", file=sys.stderr, flush=True)
    if proc.wait() != 0:
        raise RuntimeError(f"{name}: the trainer failed (exit code {proc.returncode}); config {path}")
    records = [r for r in read_trace(trace / "rank0.jsonl") if "eval_step" in r]
    evals = [
        {
            "step": r["eval_step"],
            "val_loss": r["val_loss"],
            "val_tokens": r["val_tokens"],
            "flops": flops_at(r["eval_step"]),
        }
        for r in records
    ]
    done.write_text(json.dumps(evals))
    log(f"{name}: final validation loss {evals[-1]['val_loss']:.4f} in {time.monotonic() - started:.0f} s")
    return evals


def summarise(results: dict[str, dict[int, list[dict]]], runs: list[Variant]) -> list[dict[str, Any]]:
    rows = []
    for variant in runs:
        finals = [evals[-1]["val_loss"] for evals in results[variant.name].values()]
        flops = next(iter(results[variant.name].values()))[-1]["flops"]
        rows.append(
            {
                "variant": variant.name,
                "steps": variant.steps,
                "training_flops": flops,
                "seeds": len(finals),
                "val_loss_mean": statistics.fmean(finals),
                "val_loss_min": min(finals),
                "val_loss_max": max(finals),
                "val_ppl_mean": statistics.fmean(math.exp(x) for x in finals),
                "val_ppl_min": math.exp(min(finals)),
                "val_ppl_max": math.exp(max(finals)),
            }
        )
    return rows


def write_table(rows: list[dict[str, Any]], path: Path, dense_flops: float) -> str:
    lines = [
        "| variant | steps | training FLOPs (vs dense) | val loss mean [min, max] | val PPL mean [min, max] |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['steps']} | {r['training_flops']:.3e} ({r['training_flops'] / dense_flops:.3f}) | "
            f"{r['val_loss_mean']:.4f} [{r['val_loss_min']:.4f}, {r['val_loss_max']:.4f}] | "
            f"{r['val_ppl_mean']:.2f} [{r['val_ppl_min']:.2f}, {r['val_ppl_max']:.2f}] |"
        )
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def plot(results: dict[str, dict[int, list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for index, (name, by_seed) in enumerate(results.items()):
        color = f"C{index}"
        for seed, evals in sorted(by_seed.items()):
            ax.plot(
                [e["flops"] for e in evals],
                [e["val_loss"] for e in evals],
                color=color,
                alpha=0.85,
                marker="o",
                markersize=3,
                label=name if seed == min(by_seed) else None,
            )
    ax.set_xlabel("training FLOPs (paper formula, guides included)")
    ax.set_ylabel("validation loss")
    ax.set_title("32% LowRank with self-guided training at equal FLOPs (one line per seed)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "sgt_study")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--base-steps", type=int, default=300, help="S: the dense model's steps")
    parser.add_argument("--eval-interval", type=int, default=50)
    parser.add_argument("--only", nargs="*", help="train only these variants (finished runs are reused anyway)")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.base_steps < 10:
        parser.error(f"--seeds={args.seeds} must be >= 1 and --base-steps={args.base_steps} >= 10")
    out = args.out.resolve()
    data = ensure_data(out)
    runs = variants(args.base_steps)
    ratio = same_flops_ratio(runs[1].model())
    log(f"same-FLOPs ratio g/S = {ratio:.3f}; steps: " + ", ".join(f"{v.name} {v.steps}" for v in runs))
    results: dict[str, dict[int, list[dict]]] = {v.name: {} for v in runs}
    unknown = set(args.only or ()) - {v.name for v in runs}
    if unknown:
        parser.error(f"--only {sorted(unknown)}: unknown variants; expected some of {[v.name for v in runs]}")
    for seed in range(1, args.seeds + 1):
        for variant in runs:
            if args.only is None or variant.name in args.only:
                results[variant.name][seed] = train(variant, seed, args.base_steps, out, data, args.eval_interval)
    if args.only is not None:
        log(f"trained {args.only}; run without --only for the table and the plot")
        return 0
    rows = summarise(results, runs)
    dense_flops = rows[0]["training_flops"]
    (out / "results.json").write_text(json.dumps({"rows": rows, "runs": results, "ratio": ratio}, indent=2))
    print(write_table(rows, out / "table.md", dense_flops))
    plot(results, out / "loss_vs_flops.png")
    log(f"wrote {out / 'table.md'}, {out / 'results.json'} and {out / 'loss_vs_flops.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
