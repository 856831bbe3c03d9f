"""Training throughput and MFU of dense against structured models, through the real training step.

    python benchmarks/train_throughput.py                       # tiny and s, dense vs 32% LowRank
    python benchmarks/train_throughput.py --sizes tiny --steps 10 --json out.json

Each case builds the model, megatron DDP and optimizer exactly as the
trainer does (``megatron_sffn.training.model_setup``) and times full
optimizer steps (forward, backward, gradient sync, update) of
``megatron_sffn.training.step.train_step`` on synthetic token batches, so
data loading is excluded.  MFU counts the model's training FLOPs by the
structured formula of "Building on Efficient Foundations" (Wei et al.,
NeurIPS 2024) — the FLOPs the structured model actually needs — against the
device peak: the datasheet on a GPU, or on the CPU the fp32 matmul
throughput measured in the same process (CPU "MFU" is relative to achieved
matmul speed).  Dense and structured run in the same process, alternating step by
step, so their ratio is comparable even on a loaded machine; the absolute
figures (and the CPU peak, measured before and after each size, the best kept)
are not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from megatron_sffn.config.loading import load_config  # noqa: E402
from megatron_sffn.config.train import TrainConfig  # noqa: E402
from megatron_sffn.planning.steps import resolved_train_steps  # noqa: E402

# size -> (dense config, 32% LowRank config, default micro-batch, default sequence length)
SIZES = {
    "tiny": ("configs/tiny_dense.yaml", "configs/tiny.yaml", 4, None),
    "s": ("configs/paper/s_dense.yaml", "configs/paper/s_lowrank32.yaml", 1, 512),
}


@dataclass
class CaseResult:
    size: str
    structure: str
    params: int
    seq_length: int
    tokens_per_step: int
    seconds_per_step: float
    cpu_seconds_per_step: float  # process CPU time (all threads): robust to other processes' load
    tokens_per_s: float
    tflops: float
    mfu: float
    flops_per_token: float


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def case_config(path: str, micro_batch: int, seq_length: int | None) -> TrainConfig:
    overrides = [
        f"training.micro_batch_size={micro_batch}",
        f"training.global_batch_size={micro_batch}",
        "training.train_steps=1000",
        "training.train_tokens=null",
        "training.precision=auto",
        "data.path=unused",
        "parallel.tensor_parallel=1",
        "parallel.pipeline_parallel=1",
    ]
    if seq_length is not None:
        overrides.append(f"model.seq_length={seq_length}")
    return load_config(TrainConfig, REPO_ROOT / path, overrides)


def random_batches(config: TrainConfig, count: int, generator: torch.Generator) -> list[dict]:
    b, s = config.training.micro_batch_size, config.model.seq_length
    batches = []
    for _ in range(count):
        tokens = torch.randint(0, config.model.vocab_size, (b, s + 1), generator=generator)
        batches.append(
            {
                "tokens": tokens[:, :-1].contiguous(),
                "labels": tokens[:, 1:].contiguous(),
                "loss_mask": torch.ones(b, s),
                "position_ids": torch.arange(s).repeat(b, 1),
                "attention_mask": None,
            }
        )
    return batches


class Case:
    """One model with its DDP wrapper, optimizer and schedule, built as the trainer builds them."""

    def __init__(self, size: str, structure: str, config: TrainConfig) -> None:
        from megatron_sffn.model import seed_model_parallel
        from megatron_sffn.training.model_setup import (
            Numerics,
            build_model,
            build_optimizer,
            install_schedule_hooks,
            wrap_data_parallel,
        )
        from megatron_sffn.training.schedule import build_lr_scheduler

        self.size, self.structure, self.config = size, structure, config
        seed_model_parallel(config.training.seed)
        numerics = Numerics.resolve(config, torch.cuda.is_available())
        self.model = [wrap_data_parallel(build_model(config, numerics), numerics)]
        install_schedule_hooks(self.model)
        self.optimizer = build_optimizer(config, numerics, self.model)
        self.scheduler = build_lr_scheduler(self.optimizer, config.optimizer, resolved_train_steps(config), 0)
        self.generator = torch.Generator().manual_seed(0)
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    def step(self) -> tuple[float, float, float]:
        """One optimizer step; returns (wall seconds, process CPU seconds, loss)."""
        from megatron_sffn.training.step import to_device, train_step

        batches = [to_device(b) for b in random_batches(self.config, 1, self.generator)]
        self.scheduler.step(increment=1)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        result = train_step(
            self.model,
            self.optimizer,
            batches,
            seq_length=self.config.model.seq_length,
            micro_batch_size=self.config.training.micro_batch_size,
            stop_flag=0.0,
        )
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start, time.process_time() - cpu_start, result.loss

    def result(self, peak_flops: float) -> CaseResult:
        from megatron_sffn.accounting.model import training_flops_per_token

        seconds = statistics.median(self.times)
        tokens = self.config.tokens_per_step()
        flops_per_token = training_flops_per_token(self.config.model)
        flops = flops_per_token * tokens / seconds
        params = sum(p.numel() for p in self.model[0].parameters())
        return CaseResult(
            self.size,
            self.structure,
            params,
            self.config.model.seq_length,
            tokens,
            seconds,
            statistics.median(self.cpu_times),
            tokens / seconds,
            flops / 1e12,
            flops / peak_flops,
            flops_per_token,
        )


def measure_size(size: str, cases: list[Case], warmup: int, steps: int) -> None:
    """Alternate the cases step by step, so a change in machine load hits dense and structured alike."""
    for i in range(warmup + steps):
        phase = "warm-up" if i < warmup else "timed"
        for case in cases:
            seconds, cpu_seconds, loss = case.step()
            log(
                f"  {size}/{case.structure}: step {i + 1}/{warmup + steps} ({phase}) {seconds:.2f} s "
                f"({cpu_seconds:.2f} CPU-s), loss {loss:.3f}"
            )
            if i >= warmup:
                case.times.append(seconds)
                case.cpu_times.append(cpu_seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["tiny", "s"])
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per case")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case (the median is reported)")
    parser.add_argument("--micro-batch", type=int, help="sequences per step (default: 4 for tiny, 1 for s)")
    parser.add_argument("--seq-length", type=int, help="override the sequence length (default: tiny 256, s 512)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: all cores)")
    parser.add_argument("--json", type=Path, help="write the results to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from megatron_sffn import cpu_compat
    from megatron_sffn.planning.devices import resolve_peak_flops

    cpu_compat.enable_if_no_cuda()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    precision = "bf16" if device.type == "cuda" else "fp32"
    peak = resolve_peak_flops(device, precision)
    if peak is None:
        parser.error("unknown device peak: this GPU is not in the datasheet table")
    log(f"device peak: {peak.flops_per_second / 1e12:.3f} TFLOP/s ({peak.source})")
    from megatron_sffn.model import initialize_model_parallel

    initialize_model_parallel(1, 1)
    results = []
    for size in args.sizes:
        dense_path, structured_path, micro, seq = SIZES[size]
        cases = [
            Case(size, structure, case_config(path, args.micro_batch or micro, args.seq_length or seq))
            for structure, path in (("dense", dense_path), ("lowrank32", structured_path))
        ]
        measure_size(size, cases, args.warmup, args.steps)
        if device.type == "cpu":  # a busy machine only ever lowers a measured peak: keep the best
            peak = max(peak, resolve_peak_flops(device, precision), key=lambda p: p.flops_per_second)
        results += [case.result(peak.flops_per_second) for case in cases]
        del cases

    print(
        f"{'size':<5} {'FFN':<10} {'params':>9} {'seq':>5} {'s/step':>8} {'CPU-s/step':>10} {'tok/s':>9} "
        f"{'TFLOP/s':>8} {'MFU':>7} {'speed-up':>9} {'(CPU time)':>10} {'FLOP ratio':>10}"
    )
    dense = {r.size: r for r in results if r.structure == "dense"}
    for r in results:
        base = dense[r.size]
        print(
            f"{r.size:<5} {r.structure:<10} {r.params / 1e6:>8.2f}M {r.seq_length:>5} {r.seconds_per_step:>8.3f} "
            f"{r.cpu_seconds_per_step:>10.3f} {r.tokens_per_s:>9.0f} {r.tflops:>8.4f} {100 * r.mfu:>6.1f}% "
            f"{base.seconds_per_step / r.seconds_per_step:>8.2f}x "
            f"{base.cpu_seconds_per_step / r.cpu_seconds_per_step:>9.2f}x "
            f"{base.flops_per_token / r.flops_per_token:>9.2f}x"
        )
    if args.json:
        from megatron_sffn.training.checkpoint_dirs import write_text_atomic

        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "peak_tflops": peak.flops_per_second / 1e12,
            "peak_source": peak.source,
            "results": [asdict(r) for r in results],
        }
        write_text_atomic(args.json, json.dumps(payload, indent=2) + "\n")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
