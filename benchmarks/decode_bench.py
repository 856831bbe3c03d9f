"""Decoding latency: dense vs structured vs pre-merged FFNs, per token count, and decode tokens/s.

Three measurements, all through the project's own modules (megatron's MLP
with this project's structured linears, ``GPTModel.forward`` with a
``StaticInferenceContext``):

1. **FFN call** of one layer (``fc2(gelu(fc1(x)))``) against the number of
   tokens in the call, for the dense FFN, the structured FFN (factors) and
   the pre-merged FFN (the merged dense shards), at every width given;
2. **model step**: one ``GPTModel.forward`` of n tokens over an empty KV cache
   (logits of the last token only), for the dense, structured and pre-merged
   model of each shape;
3. **decode tokens/s** of :class:`megatron_sffn.inference.Decoder` at several
   batch sizes (short prompts, greedy, no EOS), same three models.

The crossover is the smallest measured token count from which on the
factors are faster than the merged shards; below it the pre-merged form
should match dense (it is the same dense product) and above it the
structured speed.  ``--pre-merge auto`` measures the same thing per linear
at load time (``megatron_sffn.inference.premerge``).  Cases are timed
round-robin (one run of every case per round) and medians reported, so load
from other processes hits all cases alike; the load average is printed.
Weights use the cheap normal init: timing does not depend on their values.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from megatron_sffn.accounting.presets import PAPER_BLOCKDENSE_BLOCKS, preset, with_structure
from megatron_sffn.config import ModelConfig
from megatron_sffn.config.loading import load_config

STRUCTURED = ("lowrank", "blockdense", "blockshuffle")
FORMS = ("dense", "structured", "pre-merged")
REPO_ROOT = Path(__file__).resolve().parents[1]


def progress(message: str) -> None:
    print(f"[decode_bench] {message}", file=sys.stderr, flush=True)


def shape_config(shape: str, structure: str, ratio: float) -> ModelConfig:
    """``tiny`` (configs/tiny.yaml's model) or a paper preset, with its FFNs made ``structure`` at ``ratio``."""
    if shape == "tiny":
        base = _tiny_model()
    else:
        base = preset(shape)
    base = dataclasses.replace(base, ffn=dataclasses.replace(base.ffn, init="normal"))
    if structure == "dense":
        return dataclasses.replace(base, ffn=dataclasses.replace(base.ffn, structure="dense", rank=None, blocks=None))
    blocks = PAPER_BLOCKDENSE_BLOCKS.get(shape, 2) if structure == "blockdense" else None
    return with_structure(base, structure, ratio=ratio, blocks=blocks)


def _tiny_model() -> ModelConfig:
    from megatron_sffn.config.train import TrainConfig

    return load_config(TrainConfig, REPO_ROOT / "configs" / "tiny.yaml", ["data.path=unused"]).model


def timed(fn: Callable[[], object]) -> float:
    """Seconds of one call (synchronised on CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def round_robin(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per case; one warm-up round, then ``repeats`` rounds of every case in turn."""
    runs: dict[str, list[float]] = {name: [] for name in cases}
    for round_index in range(repeats + 1):
        for name, fn in cases.items():
            seconds = timed(fn)
            if round_index:
                runs[name].append(seconds)
    return {name: statistics.median(values) for name, values in runs.items()}


def three_forms(shape: str, structure: str, ratio: float, build: Callable[[ModelConfig], torch.nn.Module]):
    """(dense, structured, pre-merged) modules of ``shape``; the last two share their factors."""
    from megatron_sffn.inference import apply_pre_merge

    dense = build(shape_config(shape, "dense", ratio))
    structured = build(shape_config(shape, structure, ratio))
    merged_bytes = apply_pre_merge(structured, "on").extra_bytes
    return dense, structured, merged_bytes


def with_merge(module: torch.nn.Module, on: bool) -> None:
    """Route every structured linear of ``module`` to its merged shard (``on``) or to its factors."""
    from megatron_sffn.inference import structured_linears
    from megatron_sffn.parallel.premerge import ALWAYS, NEVER

    for layer in structured_linears(module):
        layer.merge_threshold = ALWAYS if on else NEVER


def forms(dense, structured) -> dict[str, Callable[[Callable], Callable]]:
    """Wrap a call so it runs on the named form."""

    def on(module, merged: bool | None):
        def wrap(call):
            def run():
                if merged is not None:
                    with_merge(module, merged)
                return call(module)

            return run

        return wrap

    return {"dense": on(dense, None), "structured": on(structured, False), "pre-merged": on(structured, True)}


def crossover(rows: list[dict]) -> int | None:
    """Smallest token count from which on the factors beat the merged shards (None: never in range)."""
    found = None
    for row in sorted(rows, key=lambda r: r["tokens"], reverse=True):
        if row["structured"] < row["pre-merged"]:
            found = row["tokens"]
        else:
            break
    return found


def build_mlp(model_cfg: ModelConfig) -> torch.nn.Module:
    """Layer 1's MLP (structured unless the config is dense) as the model builder makes it."""
    from megatron.core.transformer.spec_utils import build_module

    from megatron_sffn.model import transformer_config
    from megatron_sffn.parallel.mlp_spec import mlp_spec

    config = transformer_config(model_cfg)
    return build_module(mlp_spec(model_cfg, 1), config=config).eval()


def build_model(model_cfg: ModelConfig) -> torch.nn.Module:
    from megatron_sffn.model import build_gpt_model

    return build_gpt_model(model_cfg).eval()


def _call(module: torch.nn.Module, x: torch.Tensor):
    return module(x)


@torch.no_grad()
def ffn_latency(shapes, structures, ratio, tokens: Sequence[int], repeats: int) -> list[dict]:
    rows = []
    for shape in shapes:
        for structure in structures:
            dense, structured, extra = three_forms(shape, structure, ratio, build_mlp)
            width = dense.config.hidden_size
            progress(f"FFN {shape} (d={width}) {structure}: {len(tokens)} token counts")
            for n in tokens:
                x = torch.randn(n, 1, width)
                wrapped = forms(dense, structured)
                medians = round_robin(
                    {name: wrap(functools.partial(_call, x=x)) for name, wrap in wrapped.items()}, repeats
                )
                rows.append(
                    {
                        "shape": shape,
                        "width": width,
                        "structure": structure,
                        "tokens": n,
                        "merged_bytes": extra,
                        **medians,
                    }
                )
    return rows


def _prefill_step(model, n: int, vocab: int) -> Callable[[torch.nn.Module], object]:
    from megatron.core.inference.contexts import StaticInferenceContext

    tokens = torch.randint(0, vocab, (1, n))
    positions = torch.arange(n).unsqueeze(0)

    def step(module):
        context = StaticInferenceContext(max_batch_size=1, max_sequence_length=n)
        return module(tokens, positions, None, inference_context=context, runtime_gather_output=True)

    return step


@torch.no_grad()
def model_latency(shapes, structure, ratio, tokens: dict[str, Sequence[int]], repeats: int) -> list[dict]:
    rows = []
    for shape in shapes:
        dense, structured, extra = three_forms(shape, structure, ratio, build_model)
        progress(f"model step {shape} {structure}: token counts {list(tokens[shape])}")
        for n in tokens[shape]:
            step = _prefill_step(dense, n, dense.vocab_size)
            wrapped = forms(dense, structured)
            medians = round_robin({name: wrap(step) for name, wrap in wrapped.items()}, repeats)
            rows.append({"shape": shape, "structure": structure, "tokens": n, "merged_bytes": extra, **medians})
    return rows


def _decode(module: torch.nn.Module, prompts, params, context: int):
    from megatron_sffn.inference import Decoder

    return Decoder(module, eos_id=None, context_length=context).generate(prompts, params)


@torch.no_grad()
def decode_throughput(
    shapes, structure, ratio, batches: Sequence[int], prompt_tokens: int, new_tokens: int, repeats: int
) -> list[dict]:
    from megatron_sffn.inference import SamplingParams

    rows = []
    params = SamplingParams(max_new_tokens=new_tokens)
    for shape in shapes:
        dense, structured, extra = three_forms(shape, structure, ratio, build_model)
        context = dense.max_sequence_length
        for batch in batches:
            progress(f"decode {shape} {structure}: batch {batch}")
            prompts = torch.randint(0, dense.vocab_size, (batch, prompt_tokens)).tolist()
            rates: dict[str, list[float]] = {name: [] for name in FORMS}
            run = functools.partial(_decode, prompts=prompts, params=params, context=context)
            for round_index in range(repeats + 1):
                for name, wrap in forms(dense, structured).items():
                    output = wrap(run)()
                    if round_index:
                        rates[name].append(output.decode_tokens_per_s)
            rows.append(
                {
                    "shape": shape,
                    "structure": structure,
                    "batch": batch,
                    "merged_bytes": extra,
                    **{name: statistics.median(v) for name, v in rates.items()},
                }
            )
    return rows


def format_latency(rows: list[dict], key: str) -> str:
    header = f"{key:<22}{'tokens':>7}{'dense ms':>11}{'struct ms':>11}{'merged ms':>11}"
    lines = [header + f"{'struct/dense':>14}{'merged/dense':>14}"]
    for r in rows:
        label = f"{r['shape']} {r['structure']}" + (f" d={r['width']}" if "width" in r else "")
        lines.append(
            f"{label:<22}{r['tokens']:>7}{r['dense'] * 1e3:>11.3f}{r['structured'] * 1e3:>11.3f}"
            f"{r['pre-merged'] * 1e3:>11.3f}{r['structured'] / r['dense']:>13.2f}x"
            f"{r['pre-merged'] / r['dense']:>13.2f}x"
        )
    return "\n".join(lines)


def format_crossovers(rows: list[dict], group: Sequence[str]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in group), []).append(r)
    lines = []
    for key, members in groups.items():
        point = crossover(members)
        where = f"structured faster from {point} tokens on" if point else "merged never slower in the measured range"
        extra = members[0]["merged_bytes"] / 2**20
        lines.append(f"  {' '.join(str(k) for k in key)}: {where} (merged shards +{extra:.2f} MiB)")
    return "\n".join(lines)


def format_decode(rows: list[dict]) -> str:
    header = f"{'model':<22}{'batch':>6}{'dense tok/s':>13}{'struct tok/s':>14}{'merged tok/s':>14}"
    lines = [header + f"{'struct/dense':>14}{'merged/dense':>14}"]
    for r in rows:
        lines.append(
            f"{r['shape'] + ' ' + r['structure']:<22}{r['batch']:>6}{r['dense']:>13.1f}{r['structured']:>14.1f}"
            f"{r['pre-merged']:>14.1f}{r['structured'] / r['dense']:>13.2f}x{r['pre-merged'] / r['dense']:>13.2f}x"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--shapes", nargs="+", default=["tiny", "s"], help="tiny (configs/tiny.yaml) or paper presets")
    p.add_argument("--structures", nargs="+", default=list(STRUCTURED), choices=STRUCTURED)
    p.add_argument("--ratio", type=float, default=0.32, help="FFN parameter ratio of the structured models")
    p.add_argument("--ffn-tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024, 4096])
    p.add_argument("--model-tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024])
    p.add_argument(
        "--model-max-tokens",
        type=int,
        default=None,
        help="model-step token counts above this are skipped (default: 4096 for tiny, 256 otherwise)",
    )
    p.add_argument("--model-structure", default="lowrank", choices=STRUCTURED, help="structure of the model runs")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--prompt-tokens", type=int, default=8, help="prompt length of the decode runs")
    p.add_argument("--new-tokens", type=int, default=8, help="decoded tokens per prompt")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    p.add_argument("--sections", nargs="+", default=["ffn", "model", "decode"], choices=["ffn", "model", "decode"])
    p.add_argument("--threads", type=int, default=None, help="CPU threads (None: all cores available)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    for name in ("repeats", "prompt_tokens", "new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def load_average() -> list[str]:
    path = Path("/proc/loadavg")
    return path.read_text().split()[:3] if path.exists() else ["?"]


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    from megatron_sffn import cpu_compat
    from megatron_sffn.model import initialize_model_parallel, seed_model_parallel

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    cpu_compat.enable_if_no_cuda()
    initialize_model_parallel(1, 1)
    seed_model_parallel(0)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {threads} threads"
    load = load_average()
    progress(f"{device}, fp32, load average {' '.join(load)}")
    limits = {s: args.model_max_tokens or (4096 if s == "tiny" else 256) for s in args.shapes}
    result: dict = {"device": device, "load_average_start": load, "threads": threads, "torch": torch.__version__}
    if "ffn" in args.sections:
        rows = ffn_latency(args.shapes, args.structures, args.ratio, args.ffn_tokens, args.repeats)
        print(f"One FFN call, fp32, {device}, median of {args.repeats}\n{format_latency(rows, 'FFN')}")
        print("Crossover per structure and width:\n" + format_crossovers(rows, ("shape", "structure", "width")))
        result["ffn"] = rows
    if "model" in args.sections:
        tokens = {s: [n for n in args.model_tokens if n <= limits[s]] for s in args.shapes}
        rows = model_latency(args.shapes, args.model_structure, args.ratio, tokens, args.repeats)
        print(f"\nOne model step (prefill of n tokens, last-token logits)\n{format_latency(rows, 'model')}")
        print("Crossover per model:\n" + format_crossovers(rows, ("shape", "structure")))
        result["model"] = rows
    if "decode" in args.sections:
        rows = decode_throughput(
            args.shapes,
            args.model_structure,
            args.ratio,
            args.batches,
            args.prompt_tokens,
            args.new_tokens,
            args.repeats,
        )
        print(
            f"\nDecode tokens/s ({args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, greedy)\n"
            f"{format_decode(rows)}"
        )
        result["decode"] = rows
    result["load_average_end"] = load_average()
    progress(f"load average at the end {' '.join(result['load_average_end'])}")
    if args.json:
        from megatron_sffn.atomic_io import write_text_atomic

        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
