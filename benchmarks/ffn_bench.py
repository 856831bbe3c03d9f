"""Latency of one FFN, dense against each structure at the paper's parameter ratios.

The FFN is ``fc2(gelu_tanh(fc1(x)))`` with ``fc1: d -> f`` and ``fc2: f -> d``,
both layers structured alike (one FFN, so the paper's layer-0-dense rule does
not apply).  BlockShuffle is the paper's FFN: fc1's hidden units in the
paper's interleaved order, which fc2's block-diagonal first factor reads.
R and B come from the project's ratio solver with the paper's
rounding (R a multiple of 256 where possible), BlockDense with B=4 as in the
paper's m/xl settings.

Every reported number is a median over ``--repeats`` timed runs after
``--warmup`` untimed ones.  The cases are timed round-robin (one run of every
case per round) rather than one case after another, so that a burst of load
from other processes on a shared machine hits dense and structured alike and
the speed-ups stay meaningful even when absolute times drift.

On a machine shared with other jobs, ``--threads 1 --clock process`` times
this process's own CPU time, which the other jobs do not inflate as they do
the wall time (they still share caches and memory bandwidth).

Speed-up is dense time over structured time from the same invocation; the
ideal speed-up is the FLOP ratio (dense over structured FFN weight
parameters, the paper's accounting); efficiency is their quotient.

The GELU between the linears acts on the f-wide hidden vector, which a
structured FFN keeps at full width, so its time does not shrink with the
weights.  Each round also times the GELU alone (forward, and forward +
backward, on a ``tokens x f`` input), and the ``bound`` columns give the
speed-up a structured FFN would reach if its linears ran exactly at the FLOP
ratio of the dense linears and cost nothing else:
``dense / ((dense - gelu) / ideal + gelu)``.  No implementation of the same
function can pass it.

The bound assumes the structured matrix products run as fast per FLOP as the
dense ones.  ``--matmul-floor`` checks that on the machine at hand: every run
is recorded by the PyTorch profiler, the time spent inside the BLAS calls
(``mm``, ``bmm``, ``addmm``, ``baddbmm``; wall time) is summed per run, and
the ``floor`` columns give ``dense / (matmuls + gelu)``: the speed-up if
everything but those calls and the GELU were free.  An implementation that
keeps these products can at most reach it; the ``matmul`` columns are the
speed-up of the products alone, dense over structured.

On CPU, glibc hands every large tensor fresh pages from the kernel, and
first-touching them costs more than the work done on them (about 55 ms per
128 MB on a 2-core development VM, against 31 ms to copy 128 MB into memory
already mapped).  Structured layers create more transient activations per FLOP
than dense ones, so this cost lowers their speed-up.  ``--keep-freed-memory``
tells glibc to keep and reuse freed memory, as a process-wide caching
allocator (jemalloc, tcmalloc) would.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from megatron_sffn.accounting.ratio import paper_ffn_sizes
from megatron_sffn.structured import build_linear, counts

STRUCTURED = ("lowrank", "blockdense", "blockshuffle")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Case:
    """One FFN variant: its sizes and its FLOP accounting."""

    structure: str
    target_ratio: float | None  # None for the dense baseline
    rank: int | None
    blocks: int | None
    weight_params: int  # both layers, bias excluded (= multiply-adds per token)

    @property
    def label(self) -> str:
        ratio = "" if self.target_ratio is None else f" {self.target_ratio:.0%}"
        return f"{self.structure}{ratio} ({self.sizes})"

    @property
    def sizes(self) -> str:
        parts = [f"R={self.rank}"] if self.rank is not None else []
        parts += [f"B={self.blocks}"] if self.blocks is not None else []
        return " ".join(parts) or "-"


class FFN(nn.Module):
    """fc1, GELU (tanh approximation, as in the paper), fc2."""

    def __init__(self, case: Case, d: int, f: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        # Timing does not depend on the values, so every structure uses the cheap
        # normal init instead of its SVD-based default (minutes at d=2048 on a CPU).
        common = dict(rank=case.rank, blocks=case.blocks, init_method="normal", dtype=dtype, device=device)
        self.fc1 = build_linear(case.structure, d, f, **common)
        self.fc2 = build_linear(case.structure, f, d, **common)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def ffn_weight_params(structure: str, d: int, f: int, rank: int | None, blocks: int | None) -> int:
    return counts.weight_params(structure, d, f, rank, blocks) + counts.weight_params(structure, f, d, rank, blocks)


def build_cases(
    d: int, f: int, structures: Sequence[str], ratios: Sequence[float], blockdense_blocks: int
) -> list[Case]:
    """Dense first (the baseline), then every structure at every ratio."""
    cases = [Case("dense", None, None, None, ffn_weight_params("dense", d, f, None, None))]
    for structure in structures:
        for ratio in ratios:
            blocks = blockdense_blocks if structure == "blockdense" else None
            sizes = paper_ffn_sizes(structure, d, f, ratio, blocks=blocks)
            params = ffn_weight_params(structure, d, f, sizes.rank, sizes.blocks)
            cases.append(Case(structure, ratio, sizes.rank, sizes.blocks, params))
    return cases


def make_timer(device: torch.device, clock: str = "wall") -> Callable[[Callable[[], None]], float]:
    """A function that runs a callable once and returns its time in ms.

    ``wall``: elapsed time (CUDA events on GPU).  ``process``: the CPU time of
    this process, which other processes on a loaded machine do not inflate as
    they do the wall time (they still share caches and memory bandwidth); with
    one thread it is that thread's compute time.
    """
    if device.type == "cuda":

        def cuda_time(fn: Callable[[], None]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end)

        return cuda_time

    now = time.process_time if clock == "process" else time.perf_counter

    def cpu_time(fn: Callable[[], None]) -> float:
        start = now()
        fn()
        return (now() - start) * 1e3

    return cpu_time


MATMUL_OPS = frozenset({"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addmm_", "aten::baddbmm_"})


def matmul_ms(fn: Callable[[], None]) -> float:
    """Run ``fn`` once under the profiler; the time (ms) its BLAS products took on the calling thread."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in MATMUL_OPS) / 1e3


class ActivationWorkload:
    """The FFN's GELU alone on its ``tokens x f`` input, timed like a :class:`Workload`."""

    def __init__(self, hidden: torch.Tensor, grad: torch.Tensor) -> None:
        self.hidden, self.grad = hidden.requires_grad_(True), grad

    def forward(self) -> None:
        with torch.no_grad():
            F.gelu(self.hidden, approximate="tanh")

    def forward_backward(self) -> None:
        F.gelu(self.hidden, approximate="tanh").backward(self.grad)

    def clear_grads(self) -> None:
        self.hidden.grad = None


class Workload:
    """The two timed steps of one FFN: forward only (no autograd) and forward + backward."""

    def __init__(self, ffn: FFN, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        self.ffn, self.x, self.grad_out = ffn, x, grad_out

    def forward(self) -> None:
        with torch.no_grad():
            self.ffn(self.x)

    def forward_backward(self) -> None:
        self.ffn(self.x).backward(self.grad_out)

    def clear_grads(self) -> None:
        """Drop gradients between runs so that no run pays for accumulating into the last one's."""
        self.x.grad = None
        for p in self.ffn.parameters():
            p.grad = None


ACTIVATION = "activation"  # key of the GELU-alone timings


def measure(
    cases: Sequence[Case], args: argparse.Namespace, dtype: torch.dtype, device: torch.device
) -> dict[Case | str, dict[str, list[float]]]:
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.tokens, args.width, generator=generator, dtype=dtype, device=device)
    grad_out = torch.randn(args.tokens, args.width, generator=generator, dtype=dtype, device=device)
    x.requires_grad_(True)  # the FFN input gradient is part of a training step
    timer = make_timer(device, args.clock)

    def run(fn: Callable[[], None]) -> tuple[float, float | None]:
        """(time of one run, its matmul time when ``--matmul-floor`` records it) in ms."""
        if not args.matmul_floor:
            return timer(fn), None
        elapsed: list[float] = []
        matmuls = matmul_ms(lambda: elapsed.append(timer(fn)))
        return elapsed[0], matmuls

    workloads = {}
    for case in cases:
        progress(f"building {case.label}")
        ffn = FFN(case, args.width, args.ffn_hidden, dtype, device)
        workloads[case] = Workload(ffn, x, grad_out)
    hidden = torch.randn(args.tokens, args.ffn_hidden, generator=generator, dtype=dtype, device=device)
    workloads[ACTIVATION] = ActivationWorkload(hidden, torch.randn_like(hidden))
    keys = ("fwd", "fwd_bwd", "mm_fwd", "mm_fwd_bwd")
    times: dict[Case | str, dict[str, list[float]]] = {key: {k: [] for k in keys} for key in workloads}
    rounds = args.warmup + args.repeats
    for round_index in range(rounds):
        timed = round_index >= args.warmup
        phase = (
            f"repeat {round_index - args.warmup + 1}/{args.repeats}"
            if timed
            else f"warm-up {round_index + 1}/{args.warmup}"
        )
        for key, work in workloads.items():
            fwd_bwd, mm_fwd_bwd = run(work.forward_backward)
            work.clear_grads()
            fwd, mm_fwd = run(work.forward)
            label = "GELU alone" if key == ACTIVATION else key.label
            mm_note = f" (matmuls {mm_fwd:.1f} / {mm_fwd_bwd:.1f} ms)" if args.matmul_floor else ""
            progress(f"{phase} {label}: fwd {fwd:.1f} ms, fwd+bwd {fwd_bwd:.1f} ms{mm_note}")
            if timed:
                times[key]["fwd"].append(fwd)
                times[key]["fwd_bwd"].append(fwd_bwd)
                if args.matmul_floor:
                    times[key]["mm_fwd"].append(mm_fwd)
                    times[key]["mm_fwd_bwd"].append(mm_fwd_bwd)
    return times


def summarize(cases: Sequence[Case], times: dict[Case | str, dict[str, list[float]]]) -> list[dict]:
    dense = cases[0]
    base = {key: statistics.median(times[dense][key]) for key in ("fwd", "fwd_bwd")}
    gelu = {key: statistics.median(times[ACTIVATION][key]) for key in ("fwd", "fwd_bwd")}
    recorded = bool(times[dense]["mm_fwd"])
    rows = []
    for case in cases:
        median = {key: statistics.median(times[case][key]) for key in ("fwd", "fwd_bwd")}
        floor = {}
        if recorded:
            for key in ("fwd", "fwd_bwd"):
                matmuls = statistics.median(times[case][f"mm_{key}"])
                floor[f"matmul_{key}_ms"] = matmuls
                floor[f"matmul_{key}_speedup"] = statistics.median(times[dense][f"mm_{key}"]) / matmuls
                floor[f"{key}_floor"] = base[key] / (matmuls + gelu[key])
        ideal = dense.weight_params / case.weight_params
        speedup = {key: base[key] / median[key] for key in median}
        bound = {key: base[key] / ((base[key] - gelu[key]) / ideal + gelu[key]) for key in median}
        rows.append(
            {
                **asdict(case),
                "sizes": case.sizes,
                "achieved_ratio": case.weight_params / dense.weight_params,
                "fwd_ms": median["fwd"],
                "fwd_bwd_ms": median["fwd_bwd"],
                "fwd_speedup": speedup["fwd"],
                "fwd_bwd_speedup": speedup["fwd_bwd"],
                "ideal_speedup": ideal,
                "fwd_bound": bound["fwd"],
                "fwd_bwd_bound": bound["fwd_bwd"],
                "gelu_fwd_ms": gelu["fwd"],
                "gelu_fwd_bwd_ms": gelu["fwd_bwd"],
                "fwd_efficiency": speedup["fwd"] / ideal,
                "fwd_bwd_efficiency": speedup["fwd_bwd"] / ideal,
                "fwd_ms_runs": times[case]["fwd"],
                "fwd_bwd_ms_runs": times[case]["fwd_bwd"],
                **floor,
            }
        )
    return rows


def format_table(rows: Sequence[dict]) -> str:
    header = (
        f"{'structure':<13}{'ratio':>7}{'R/B':>13}{'params':>11}{'fwd ms':>10}{'fwd+bwd ms':>12}"
        f"{'speedup fwd':>13}{'fwd+bwd':>9}{'ideal':>7}{'bound fwd':>11}{'fwd+bwd':>9}{'eff fwd':>9}{'fwd+bwd':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        ratio = f"{r['achieved_ratio']:.1%}"
        lines.append(
            f"{r['structure']:<13}{ratio:>7}{r['sizes']:>13}{r['weight_params'] / 1e6:>10.2f}M"
            f"{r['fwd_ms']:>10.1f}{r['fwd_bwd_ms']:>12.1f}{r['fwd_speedup']:>12.2f}x{r['fwd_bwd_speedup']:>8.2f}x"
            f"{r['ideal_speedup']:>6.2f}x{r['fwd_bound']:>10.2f}x{r['fwd_bwd_bound']:>8.2f}x"
            f"{r['fwd_efficiency']:>9.0%}{r['fwd_bwd_efficiency']:>9.0%}"
        )
    lines.append(
        f"GELU alone (tokens x f): fwd {rows[0]['gelu_fwd_ms']:.1f} ms, fwd+bwd {rows[0]['gelu_fwd_bwd_ms']:.1f} ms"
    )
    if "fwd_floor" in rows[0]:
        lines += [
            "",
            f"{'structure':<13}{'ratio':>7}{'matmul fwd ms':>15}{'fwd+bwd ms':>12}"
            f"{'matmul speedup fwd':>20}{'fwd+bwd':>9}{'floor fwd':>11}{'fwd+bwd':>9}",
        ]
        for r in rows:
            lines.append(
                f"{r['structure']:<13}{r['achieved_ratio']:>7.1%}{r['matmul_fwd_ms']:>15.1f}{r['matmul_fwd_bwd_ms']:>12.1f}"
                f"{r['matmul_fwd_speedup']:>19.2f}x{r['matmul_fwd_bwd_speedup']:>8.2f}x"
                f"{r['fwd_floor']:>10.2f}x{r['fwd_bwd_floor']:>8.2f}x"
            )
    return "\n".join(lines)


def write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def keep_freed_memory() -> None:
    """Make glibc malloc reuse freed memory instead of mapping fresh pages for every large tensor."""
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1)
    except (OSError, AttributeError) as err:
        raise SystemExit(f"ffn_bench: --keep-freed-memory needs glibc ({err})") from err
    if not ok:
        raise SystemExit("ffn_bench: --keep-freed-memory: glibc mallopt refused M_MMAP_MAX/M_TRIM_THRESHOLD")


def progress(message: str) -> None:
    print(f"[ffn_bench] {message}", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--width", type=int, default=2048, help="model width d")
    p.add_argument("--ffn-hidden", type=int, default=None, help="FFN width f (None: 4 x width)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per FFN call (batch x sequence)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and activations")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda times with CUDA events")
    p.add_argument("--structures", default=",".join(STRUCTURED), help="comma list; dense is always measured")
    p.add_argument("--ratios", default="0.63,0.32", help="comma list of target FFN parameter ratios")
    p.add_argument("--blockdense-blocks", type=int, default=4, help="B of BlockDense (R is solved)")
    p.add_argument(
        "--keep-freed-memory", action="store_true", help="glibc malloc reuses freed memory (see the module doc)"
    )
    p.add_argument("--repeats", type=int, default=5, help="timed runs per case (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per case first")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (None: all cores available)")
    p.add_argument(
        "--clock",
        choices=("wall", "process"),
        default="wall",
        help="wall time, or this process's CPU time (robust on a shared machine; needs --threads 1 on cpu)",
    )
    p.add_argument(
        "--matmul-floor",
        action="store_true",
        help="record every run's BLAS time with the profiler and report the floor (module doc; wall clock, cpu)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    args.ffn_hidden = args.ffn_hidden or 4 * args.width
    args.structures = [s.strip() for s in args.structures.split(",") if s.strip() and s.strip() != "dense"]
    unknown = [s for s in args.structures if s not in STRUCTURED]
    if unknown:
        p.error(f"--structures: unknown {', '.join(unknown)}; expected some of {', '.join(STRUCTURED)}")
    try:
        args.ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError:
        p.error(f"--ratios={args.ratios!r}: expected comma-separated numbers such as 0.63,0.32")
    for name in ("width", "ffn_hidden", "tokens", "repeats", "blockdense_blocks"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be positive")
    if args.warmup < 0:
        p.error(f"--warmup={args.warmup} must be >= 0")
    if args.clock == "process" and (args.device != "cpu" or args.threads != 1):
        p.error("--clock process: CPU time equals compute time only for one thread on the CPU; add --threads 1")
    if args.matmul_floor and (args.device != "cpu" or args.clock != "wall"):
        p.error("--matmul-floor: the profiler's op times are wall time on the CPU; use --device cpu --clock wall")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    if args.keep_freed_memory:
        keep_freed_memory()
    torch.set_num_threads(threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    try:
        cases = build_cases(args.width, args.ffn_hidden, args.structures, args.ratios, args.blockdense_blocks)
    except ValueError as err:
        raise SystemExit(f"ffn_bench: {err}") from err
    progress(
        f"d={args.width} f={args.ffn_hidden} tokens={args.tokens} {args.dtype} on {args.device} "
        f"({threads} threads), {len(cases)} cases x ({args.warmup} warm-up + {args.repeats} timed)"
    )
    rows = summarize(cases, measure(cases, args, dtype, device))
    print(
        f"FFN d={args.width} -> f={args.ffn_hidden} -> d, {args.tokens} tokens, {args.dtype}, {args.device}, "
        f"{threads} threads, median of {args.repeats} ({args.clock} clock)"
    )
    print(format_table(rows))
    if args.json:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        write_json_atomic(
            args.json, {"config": {**config, "threads": threads, "torch": torch.__version__}, "rows": rows}
        )
        progress(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
