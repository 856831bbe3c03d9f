"""Step time against sampled FLOPs under evolving subnetwork training, through the real training step.

    python benchmarks/est_bench.py                     # s shape, dense and 32% LowRank, stages 1/2/3
    python benchmarks/est_bench.py --ffn blockshuffle32 --threads 1 # 32% BlockShuffle (a smaller Monarch per step)
    python benchmarks/est_bench.py --steps 5 --json out.json

Each model is built as the trainer builds it with ``est.enabled`` (megatron
DDP, optimizer, :func:`megatron_sffn.training.step.train_step`), and its
steps alternate between a stage-1 draw, a stage-2 draw and the full model
(stage 3), so machine load hits all three alike.  The subnetwork's training
FLOPs come from the MFU formula.  Reported: the time saving against the
full step over the FLOP saving (1.0 = the step time falls exactly with the
FLOPs), from wall time and from the process's CPU time (less sensitive to
other processes on a shared machine).  The optimizer update, embeddings and logits are not sampled, so
part of every step cannot shrink.

Before each model's stages, one of its FFNs alone (layer 1's MLP, full
and with its stage-2 hidden subset) shows the structure's own saving.

A second table times the design choice behind the sliced weights: an MLP
keeping half its hidden units through gathered (random) indices against a
contiguous range of the same size, forward and backward at the same shape.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from train_throughput import Case, case_config, log  # noqa: E402

from megatron_sffn.planning.steps import est_plan  # noqa: E402
from megatron_sffn.structured.take import take  # noqa: E402

CONFIGS = {
    "dense": "configs/est/s_dense.yaml",
    "lowrank32": "configs/est/s_lowrank32.yaml",
    "blockshuffle32": "configs/est/s_blockshuffle32.yaml",
}
STAGE_STEPS = {1: 1, 2: 400, 3: 900}  # a step of each stage of a 1000-step run (stage ends 0.3, 0.6)


def measure_stages(name: str, micro_batch: int, seq_length: int, warmup: int, steps: int) -> list[dict]:
    from megatron_sffn.training.est import EvolvingSubnetworks

    config = case_config(CONFIGS[name], micro_batch, seq_length)
    case = Case("s", name, config)
    mlp = measure_mlp(name, case, config, micro_batch * seq_length, reps=warmup + steps)
    subnetworks = EvolvingSubnetworks(est_plan(config), config.model, case.model)
    times: dict[int, list[float]] = {stage: [] for stage in STAGE_STEPS}
    cpu_times: dict[int, list[float]] = {stage: [] for stage in STAGE_STEPS}
    flops: dict[int, list[float]] = {stage: [] for stage in STAGE_STEPS}
    for i in range(warmup + steps):
        for stage, first_step in STAGE_STEPS.items():
            subnetworks.begin_step(first_step + i)
            seconds, cpu_seconds, loss = case.step()
            log(
                f"  {name} stage {stage}: step {i + 1}/{warmup + steps} {seconds:.2f} s ({cpu_seconds:.2f} CPU-s), "
                f"loss {loss:.3f}"
            )
            if i >= warmup:
                times[stage].append(seconds)
                cpu_times[stage].append(cpu_seconds)
                flops[stage].append(subnetworks.training_flops_per_token())
    full_time, full_cpu = statistics.median(times[3]), statistics.median(cpu_times[3])
    full_flops = statistics.median(flops[3])
    rows = [mlp]
    for stage in STAGE_STEPS:
        seconds, cpu, flop = (
            statistics.median(times[stage]),
            statistics.median(cpu_times[stage]),
            statistics.mean(flops[stage]),
        )
        flop_saving = 1 - flop / full_flops
        savings = {"time_saving": 1 - seconds / full_time, "cpu_time_saving": 1 - cpu / full_cpu}
        rows.append(
            {
                "ffn": name,
                "stage": stage,
                "seconds_per_step": seconds,
                "cpu_seconds_per_step": cpu,
                "flops_fraction": flop / full_flops,
                "flop_saving": flop_saving,
                **savings,
                **{f"{k}_ratio": v / flop_saving if flop_saving > 0 else None for k, v in savings.items()},
            }
        )
    return rows


def measure_mlp(name: str, case: Case, config, tokens: int, reps: int) -> dict:
    """CPU time of forward + backward of layer 1's MLP (structured, as built): full, and its stage-2 hidden subset.

    The FFN alone, so that a structure's own saving (for BlockShuffle: the
    smaller Monarch products with gathered factor rows) is seen apart from
    attention, embeddings and the optimizer.  The first of ``reps`` is a warm-up.
    """
    from megatron_sffn.accounting.model import layer_forward_flops
    from megatron_sffn.training.est import subnetwork_layers

    mlp = subnetwork_layers(case.model)[1].mlp
    draw = est_plan(config).draw(STAGE_STEPS[2])[1]
    x = torch.randn(tokens, 1, config.model.hidden_size, generator=torch.Generator().manual_seed(0), requires_grad=True)

    def run(subset) -> float:
        mlp.select_hidden(subset, draw.p_M)
        start = time.process_time()
        out, bias = mlp(x)
        (out if bias is None else out + bias).sum().backward()
        return time.process_time() - start

    times = {"full": [], "subset": []}
    for _ in range(reps):
        times["subset"].append(run(draw.hidden))
        times["full"].append(run(None))
    full, subset = (statistics.median(times[k][1:]) for k in ("full", "subset"))
    flops = (
        layer_forward_flops(config.model, 1, hidden=draw.hidden.count).ffn / layer_forward_flops(config.model, 1).ffn
    )
    log(f"  {name} MLP: full {full * 1e3:.0f} CPU-ms, p_M={draw.p_M} subset {subset * 1e3:.0f} CPU-ms")
    return {
        "ffn": name,
        "stage": "MLP",
        "cpu_seconds_full": full,
        "cpu_seconds_subset": subset,
        "flop_saving": 1 - flops,
        "cpu_time_saving": 1 - subset / full,
        "cpu_time_saving_ratio": (1 - subset / full) / (1 - flops),
    }


def measure_slicing(tokens: int, hidden: int, ffn: int, reps: int) -> dict[str, float]:
    """Forward + backward of a half-width MLP: gathered random hidden units (``take``) vs a contiguous range."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=gen)
    w1 = torch.randn(ffn, hidden, generator=gen, requires_grad=True)
    w2 = torch.randn(hidden, ffn, generator=gen, requires_grad=True)
    keep = ffn // 2
    gathered = torch.randperm(ffn, generator=gen)[:keep].sort().values

    def run(rows) -> float:
        start = time.perf_counter()
        if isinstance(rows, torch.Tensor):
            w1_part, w2_part = take(w1, rows), take(w2, rows, 1)
        else:
            w1_part, w2_part = w1[rows], w2[:, rows]
        F.linear(F.gelu(F.linear(x, w1_part)), w2_part).sum().backward()
        return time.perf_counter() - start

    times = {"gathered": [], "contiguous": [], "full": []}
    for _ in range(reps):
        times["gathered"].append(run(gathered))
        times["contiguous"].append(run(slice(0, keep)))
        times["full"].append(run(slice(0, ffn)))
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ffn", nargs="+", choices=sorted(CONFIGS), default=["dense", "lowrank32"])
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per stage")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per stage (the median is reported)")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: all cores; 1 gives steadier CPU times on a shared machine)",
    )
    parser.add_argument("--json", type=Path, help="write the results to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from megatron_sffn import cpu_compat
    from megatron_sffn.model import initialize_model_parallel

    cpu_compat.enable_if_no_cuda()
    initialize_model_parallel(1, 1)
    rows = []
    for name in args.ffn:
        rows += measure_stages(name, args.micro_batch, args.seq_length, args.warmup, args.steps)
    slicing = measure_slicing(args.micro_batch * args.seq_length, 768, 3072, reps=max(3, args.steps))
    print(
        f"{'FFN':<10} {'stage':>5} {'s/step':>8} {'CPU-s':>8} {'FLOPs':>7} {'FLOPs saved':>11} "
        f"{'time saved':>10} {'ratio':>6} {'CPU-s saved':>11} {'ratio':>6}"
    )
    for r in rows:
        if r["stage"] == "MLP":
            print(
                f"{r['ffn']:<10} {'MLP':>5} {'':>8} {r['cpu_seconds_subset']:>8.3f} {1 - r['flop_saving']:>6.1%} "
                f"{r['flop_saving']:>11.1%} {'':>10} {'':>6} {r['cpu_time_saving']:>11.1%} "
                f"{r['cpu_time_saving_ratio']:>6.2f}   (full MLP {r['cpu_seconds_full']:.3f} CPU-s)"
            )
            continue
        ratios = [f"{v:.2f}" if v is not None else "-" for v in (r["time_saving_ratio"], r["cpu_time_saving_ratio"])]
        print(
            f"{r['ffn']:<10} {r['stage']:>5} {r['seconds_per_step']:>8.3f} {r['cpu_seconds_per_step']:>8.3f} "
            f"{r['flops_fraction']:>6.1%} {r['flop_saving']:>11.1%} {r['time_saving']:>10.1%} {ratios[0]:>6} "
            f"{r['cpu_time_saving']:>11.1%} {ratios[1]:>6}"
        )
    print(
        f"half-width MLP (s shape, {args.micro_batch * args.seq_length} tokens), forward+backward: gathered "
        f"{slicing['gathered'] * 1e3:.1f} ms, contiguous {slicing['contiguous'] * 1e3:.1f} ms, "
        f"full width {slicing['full'] * 1e3:.1f} ms"
    )
    if args.json:
        args.json.write_text(json.dumps({"stages": rows, "slicing": slicing}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
