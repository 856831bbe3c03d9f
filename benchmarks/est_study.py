"""A small-scale test of evolving subnetwork training at equal training FLOPs, on CPU.

    python benchmarks/est_study.py                      # 2 seeds, dense and 32% LowRank
    python benchmarks/est_study.py --seeds 1 --base-steps 60 --out runs/est_smoke
    python benchmarks/est_study.py --structures dense --arms est --out runs/est_early \
        --est 'stage_ends=[0.2,0.4]'          # another schedule (dotted est.* overrides)

"Evolving Subnetwork Training for Large Language Models" (Li et al., 2024)
reports about 25% fewer training FLOPs with no higher final loss.  This
script trains, through the real trainer, the small GPT and the data of
``benchmarks/sgt_study.py`` (the embedded corpus, 2048-token BPE, 128-token
context) with dense and 32% LowRank FFNs: the full model for S steps, and
EST (the default schedule of ``configs/est/``, or the one ``--est``
overrides give) for as many steps as fit in the same training FLOPs, counted step by step from the actual draws with the
MFU formula.  Writes ``results.json`` and ``table.md`` under ``--out``;
a run whose final validation already exists there is not trained again, so
a schedule sweep (``--arms est`` into the baseline's ``--out``) reuses the
full-model runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from sgt_study import CONTEXT, GLOBAL_BATCH, LOWRANK32, MICRO_BATCH, MODEL, ensure_data, run_trainer  # noqa: E402

from megatron_sffn.accounting.est import est_run_flops, step_forward_flops  # noqa: E402
from megatron_sffn.accounting.model import forward_flops_per_token  # noqa: E402
from megatron_sffn.config.est import ESTConfig  # noqa: E402
from megatron_sffn.config.loading import apply_overrides, from_dict, to_dict  # noqa: E402
from megatron_sffn.config.model import ModelConfig  # noqa: E402
from megatron_sffn.est import build_plan  # noqa: E402

STRUCTURES = {"dense": {"structure": "dense"}, "lowrank32": LOWRANK32}
TOKENS_PER_STEP = GLOBAL_BATCH * CONTEXT


def est_schedule(overrides: list[str]) -> ESTConfig:
    """The EST section of the EST arm: the defaults with ``--est`` dotted overrides (strictly checked)."""
    return from_dict(ESTConfig, apply_overrides({"enabled": True}, overrides), source="--est")


def schedule_label(overrides: list[str]) -> str:
    """A run-name suffix that tells schedules apart ("" for the defaults)."""
    return "".join("-" + "".join(ch if ch.isalnum() or ch in "._=" else "_" for ch in o) for o in overrides)


def est_step_flops(cfg: ModelConfig, schedule: ESTConfig, steps: int, seed: int) -> list[float]:
    """Training FLOPs of each step of an EST run of ``steps`` (its actual draws)."""
    plan = build_plan(cfg, schedule, total_steps=steps, seed=seed)
    full = forward_flops_per_token(cfg).total
    return [
        3 * TOKENS_PER_STEP * (full if plan.rates(t).full else step_forward_flops(cfg, plan.draw(t)).total)
        for t in range(1, steps + 1)
    ]


def same_flops_steps(cfg: ModelConfig, schedule: ESTConfig, base_steps: int) -> int:
    """EST's steps whose expected training FLOPs are closest to the full model's over ``base_steps``."""
    budget = 3 * TOKENS_PER_STEP * forward_flops_per_token(cfg).total * base_steps

    def expected(steps: int) -> float:
        return est_run_flops(cfg, build_plan(cfg, schedule, total_steps=steps, seed=0), TOKENS_PER_STEP).total

    return min(range(base_steps, 2 * base_steps), key=lambda steps: abs(expected(steps) - budget))


def config(name: str, ffn: dict, steps: int, seed: int, out: Path, data: Path, est: ESTConfig | None) -> dict[str, Any]:
    section: dict[str, Any] = {
        "run_dir": str(out / "runs" / name),
        "model": {**MODEL, "ffn": dict(ffn)},
        "data": {"path": str(data), "tokenizer": str(data.parent / "tokenizer.json"), "num_workers": 0, "seed": seed},
        "optimizer": {"lr": 3.0e-3, "warmup_fraction": 0.1},
        "training": {
            "micro_batch_size": MICRO_BATCH,
            "global_batch_size": GLOBAL_BATCH,
            "train_steps": steps,
            "seed": seed,
        },
        "checkpoint": {"save_interval": None, "keep_last": 1},
        "logging": {"log_interval": 25, "tensorboard": False},
        "eval": {"interval": None, "max_batches": None, "at_end": True},
    }
    if est is not None:
        section["est"] = to_dict(est)
    return section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "est_study")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--base-steps", type=int, default=150, help="S: the full model's steps")
    parser.add_argument("--structures", default=",".join(STRUCTURES), help=f"comma list of {', '.join(STRUCTURES)}")
    parser.add_argument("--arms", default="full,est", help="comma list of full, est")
    parser.add_argument(
        "--est",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override of the EST arm's est section, e.g. 'stage_ends=[0.2,0.4]' or stage1.p_L=0.75",
    )
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.base_steps < 10:
        parser.error(f"--seeds={args.seeds} must be >= 1 and --base-steps={args.base_steps} >= 10")
    structures = [s for s in args.structures.split(",") if s]
    arms = [a for a in args.arms.split(",") if a]
    if not structures or set(structures) - set(STRUCTURES) or not arms or set(arms) - {"full", "est"}:
        parser.error(
            f"--structures={args.structures!r} --arms={args.arms!r}: expected comma lists of "
            f"{', '.join(STRUCTURES)} and of full, est"
        )
    try:
        schedule = est_schedule(args.est)
    except ValueError as err:
        parser.error(str(err))
    out = args.out.resolve()
    data = ensure_data(out)
    rows = []
    for structure in structures:
        ffn = STRUCTURES[structure]
        cfg = ModelConfig(**MODEL, ffn=dict(ffn))
        full_step = 3 * TOKENS_PER_STEP * forward_flops_per_token(cfg).total
        for seed in range(1, args.seeds + 1):
            est_steps = same_flops_steps(cfg, schedule, args.base_steps)
            per_step = est_step_flops(cfg, schedule, est_steps, seed)
            for arm in arms:
                est = schedule if arm == "est" else None
                steps = est_steps if est else args.base_steps
                name = f"{structure}-{arm}{schedule_label(args.est) if est else ''}-seed{seed}"
                flops_at = (lambda step, p=per_step: sum(p[:step])) if est else (lambda step, f=full_step: f * step)
                evals = run_trainer(name, config(name, ffn, steps, seed, out, data, est), out, flops_at)
                rows.append(
                    {
                        "structure": structure,
                        "arm": arm,
                        "schedule": args.est if est else [],
                        "seed": seed,
                        "steps": steps,
                        "flops": evals[-1]["flops"],
                        "val_loss": evals[-1]["val_loss"],
                    }
                )
    label = schedule_label(args.est)
    (out / f"results{label}.json").write_text(json.dumps(rows, indent=2))
    lines = ["| FFN | arm | steps | training FLOPs | val loss per seed | mean |", "|---|---|---:|---:|---|---:|"]
    for structure in structures:
        for arm in arms:
            mine = [r for r in rows if r["structure"] == structure and r["arm"] == arm]
            losses = ", ".join(f"{r['val_loss']:.4f}" for r in mine)
            lines.append(
                f"| {structure} | {arm} | {'/'.join(str(r['steps']) for r in mine)} | "
                f"{statistics.fmean(r['flops'] for r in mine):.3e} | {losses} | "
                f"{statistics.fmean(r['val_loss'] for r in mine):.4f} |"
            )
    table = "\n".join(lines) + "\n"
    (out / f"table{label}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
