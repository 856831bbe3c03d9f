"""The dry run's report and command line: print a run's plan, or refuse the launch with the reasons.

    python -m megatron_sffn.planning CONFIG.yaml [dotted.key=value ...] --world-size 64 --device H100

(also ``python -m megatron_sffn.train CONFIG.yaml --dry-run ...``).  Exit
status 0 for a plan that fits, 2 for a launch that would fail.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from ..config.loading import add_config_arguments, load_config, to_dict
from ..config.train import TrainConfig
from ..entry_setup import quiet_known_warnings, quiet_on_broken_pipe
from .memory import format_gib
from .plan import DEFAULT_ASSUMED_MFU, RunPlan, plan_run


def _count(n: float) -> str:
    for threshold, suffix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= threshold:
            return f"{n / threshold:.3g}{suffix}"
    return f"{n:.3g}"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _recompute_label(cfg: TrainConfig) -> str:
    t = cfg.training
    if t.recompute_granularity is None:
        return "none"
    if t.recompute_granularity == "selective":
        return "selective (core attention)"
    return f"full, {t.recompute_method}, {t.recompute_num_layers} layer(s)"


def format_plan(plan: RunPlan) -> str:
    """The human-readable report of a plan."""
    import yaml

    cfg, lay, dev = plan.config, plan.layout, plan.device
    model, p, f = cfg.model, plan.parameters, plan.forward_flops
    lines = [f"Dry run at world size {lay.world_size}: nothing allocated on a device, no process group started.", ""]
    lines.append("Resolved config")
    lines += ["  " + line for line in yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip().splitlines()]
    lines += [
        "",
        "Parallel layout",
        f"  TP {lay.tensor_parallel} x PP {lay.pipeline_parallel} x DP {lay.data_parallel} = "
        f"{lay.world_size} processes",
        f"  micro-batch {lay.micro_batch_size} x {lay.seq_length} tokens; {lay.micro_batches} micro-batch(es) per "
        f"replica per step (gradient accumulation steps: {lay.micro_batches})",
        f"  global batch {lay.global_batch_size} sequences = {lay.tokens_per_step:,} tokens per step; "
        f"{lay.train_steps:,} steps = {lay.train_tokens:,} tokens",
        "",
        f"Parameters: {p.total:,} ({_count(p.total)})",
        f"  embedding {p.embedding:,} | attention {p.attention:,} | norms {p.layernorm:,} | FFN weights "
        f"{p.ffn_weights:,} | FFN biases {p.ffn_biases:,} | output layer {p.output_layer:,}",
        f"  FFN structure: {model.ffn.structure}"
        + (f" (rank {model.ffn.rank})" if model.ffn.rank else "")
        + (f" (blocks {model.ffn.blocks})" if model.ffn.blocks else "")
        + (f", dense layers {model.ffn.dense_layers}" if model.ffn.structure != "dense" else ""),
        "",
        "FLOPs per token (Wei et al., NeurIPS 2024):",
        "  2·L·(2·d_attn·d + 2·d_kv·d + 2·seq·d_attn) + 2·(FFN weight params) + 2·V·d",
        f"  forward: attention projections {_count(f.attention_projections)} + attention scores "
        f"{_count(f.attention_scores)} + FFN {_count(f.ffn)} + logits {_count(f.logits)} = {_count(f.total)}",
        f"  training (3 x forward): {_count(3 * f.total)} per token, "
        f"{_count(3 * f.total * lay.train_tokens)} for the run",
        "",
        f"Memory per process on {dev.name} ({plan.precision}, "
        f"{'distributed' if plan.distributed_optimizer else 'plain'} optimizer, recompute: {_recompute_label(cfg)})",
        f"  {'stage':>5} {'layers':>7} {'params':>8} {'weights':>10} {'grads':>10} {'optimizer':>10} "
        f"{'activations':>22} {'total':>10}",
    ]
    for s in plan.stages:
        acts = f"{s.in_flight} x {format_gib(s.activations_per_micro_batch)}"
        if s.output_and_loss:
            acts += f" + {format_gib(s.output_and_loss)}"
        lines.append(
            f"  {s.stage:>5} {f'{s.first_layer}-{s.last_layer}':>7} {_count(s.params):>8} {format_gib(s.weights):>10} "
            f"{format_gib(s.gradients):>10} {format_gib(s.optimizer):>10} {acts:>22} {format_gib(s.total):>10}"
        )
    peak = plan.peak_stage
    lines.append(
        f"  activations per micro-batch (stage {peak.stage}): no recompute "
        f"{format_gib(peak.activations_no_recompute)}, full recompute {format_gib(peak.activations_full_recompute)}, "
        f"configured {format_gib(peak.activations_per_micro_batch)}; "
        f"last stage output and loss {format_gib(plan.stages[-1].output_and_loss)}"
    )
    capacity = format_gib(dev.memory_bytes) if dev.memory_bytes is not None else "unknown"
    lines.append(f"  peak {format_gib(peak.total)} of {capacity} ({dev.memory_source})")
    lines.append("")
    if plan.throughput is not None:
        t = plan.throughput
        lines += [
            f"Expected speed at an assumed MFU of {100 * t.assumed_mfu:.0f}% of {dev.peak_flops / 1e12:.4g} TFLOP/s "
            f"per device ({dev.peak_source})",
            f"  {_count(t.tokens_per_second)} tokens/s ({_count(t.tokens_per_second / lay.world_size)} per device), "
            f"{_duration(t.seconds_per_step)} per step, {_duration(t.run_seconds)} for {lay.train_steps:,} steps "
            f"(evaluation and checkpoints not included)",
        ]
    for note in plan.notes:
        lines.append(f"note: {note}")
    if plan.problems:
        lines.append("REFUSED: this launch would fail")
        lines += [f"  - {problem}" for problem in plan.problems]
    else:
        lines.append("OK: the layout splits and fits")
    return "\n".join(lines)


def dry_run_report(cfg: TrainConfig, world_size: int, **options) -> str:
    """Plan ``cfg`` at ``world_size`` processes and return the report (options as for :func:`plan_run`)."""
    return format_plan(plan_run(cfg, world_size, **options))


# -- command line -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_sffn.planning",
        description="Print the layout, cost, memory and expected time of a run without starting it.",
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--world-size",
        type=int,
        default=int(os.environ.get("WORLD_SIZE", "1")),
        help="processes of the launch (default: $WORLD_SIZE or 1)",
    )
    parser.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        help="processes sharing one machine's RAM in a CPU plan (default: the world size)",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="'cpu' or a GPU name such as 'H100 SXM' or 'A100-SXM4-40GB' "
        "(default: this machine's GPU from nvidia-smi, else its CPU)",
    )
    parser.add_argument(
        "--device-memory-gib",
        type=float,
        default=None,
        help="memory of one device, overriding nvidia-smi and the table",
    )
    parser.add_argument(
        "--assume-mfu",
        type=float,
        default=DEFAULT_ASSUMED_MFU,
        help=f"model FLOPs utilisation to expect (default {DEFAULT_ASSUMED_MFU})",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of the report")
    return parser.parse_intermixed_args(argv)


@quiet_on_broken_pipe
def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0 for a plan that fits, 2 for a refused launch (reasons on stderr)."""
    quiet_known_warnings()
    args = parse_args(argv)
    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
        plan = plan_run(
            cfg,
            args.world_size,
            device=args.device,
            device_memory_gib=args.device_memory_gib,
            assumed_mfu=args.assume_mfu,
            processes_per_node=args.nproc_per_node,
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: refused: {exc}", file=sys.stderr, flush=True)
        return 2
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan), flush=True)
    for problem in plan.problems:
        print(f"error: refused: {problem}", file=sys.stderr, flush=True)
    return 2 if plan.problems else 0
