"""Decoding speed and inference-state memory against context length: SUPRA recurrent vs softmax KV cache.

    python benchmarks/supra_decode_bench.py                         # 512 ... 16k tokens, batch 1 and 8
    python benchmarks/supra_decode_bench.py --contexts 512 2048 --batches 1 --steps 4

Both models are the same small GPT (``--hidden-size``, 4 layers, 4 heads),
once with softmax attention and once with SUPRA in every layer, driven
through megatron-core's ``GPTModel.forward`` with a ``StaticInferenceContext``
as a generator would.  A decode step's cost depends on the context only
through the cache it reads, so each context length L is set up by allocating
the inference state with a one-token prefill, filling it with random values
and moving ``sequence_len_offset`` to L; then ``--steps`` single-token
decode steps are timed (after one warm-up step).  Reported per (model,
batch, L): decode tokens/s (batch / the median step time, robust to a busy
machine), the inference state's
bytes (megatron's KV cache for softmax, the ``[batch, heads, d_k, d_v]``
states for SUPRA), and the ratio SUPRA / softmax in the same run.

``--generator-contexts`` then runs the real generator
(``megatron_sffn.inference.Decoder``: a chunked prefill of real prompts of
two lengths, L and L - 1 tokens, then ``--steps`` greedy tokens) on both
models, and reports its prefill and decode tokens/s and the state the
inference context holds at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from megatron_sffn.config import ModelConfig  # noqa: E402
from megatron_sffn.inference import Decoder, SamplingParams  # noqa: E402
from megatron_sffn.inference.engine import context_state_bytes  # noqa: E402
from megatron_sffn.model import (  # noqa: E402
    build_gpt_model,
    initialize_model_parallel,
    seed_model_parallel,
)


def build(attention: str, hidden: int, max_context: int):
    cfg = ModelConfig(
        hidden_size=hidden,
        num_layers=4,
        num_attention_heads=4,
        vocab_size=2048,
        seq_length=max_context,
        attention=attention,
    )
    seed_model_parallel(1234)
    model = build_gpt_model(cfg)
    model.eval()
    return model


@torch.no_grad()
def decode_rate(model, batch: int, context_length: int, steps: int) -> tuple[float, int]:
    """(decode tokens/s, inference-state bytes) at ``context_length`` tokens of context."""
    from megatron.core.inference.contexts import StaticInferenceContext

    context = StaticInferenceContext(max_batch_size=batch, max_sequence_length=context_length + steps + 2)
    token = torch.zeros(batch, 1, dtype=torch.long)
    model(token, torch.zeros_like(token), None, inference_context=context, runtime_gather_output=True)
    gen = torch.Generator().manual_seed(0)
    for memory in context.key_value_memory_dict.values():
        for t in memory if isinstance(memory, tuple) else (memory,):
            t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
    context.sequence_len_offset = context_length
    context.enable_decode_mode()
    seconds = []
    for _ in range(steps + 1):  # the first step warms up
        positions = torch.full((batch, 1), context.sequence_len_offset, dtype=torch.long)
        start = time.perf_counter()
        logits = model(token, positions, None, inference_context=context, runtime_gather_output=True)
        token = logits[:, -1].argmax(-1, keepdim=True)
        seconds.append(time.perf_counter() - start)
        context.sequence_len_offset += 1
    return batch / statistics.median(seconds[1:]), context_state_bytes(context)


def generator_rate(model, batch: int, prompt_length: int, steps: int) -> tuple[float, float, int]:
    """(prefill tokens/s, decode tokens/s, context state bytes) of ``Decoder.generate`` on random prompts."""
    gen = torch.Generator().manual_seed(prompt_length)
    prompts = [torch.randint(1, 2048, (prompt_length - row % 2,), generator=gen).tolist() for row in range(batch)]
    decoder = Decoder(model, eos_id=None, context_length=prompt_length + steps, prefill_chunk=512)
    output = decoder.generate(prompts, SamplingParams(max_new_tokens=steps))
    return output.prefill_tokens_per_s, output.decode_tokens_per_s, output.state_bytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--generator-contexts", type=int, nargs="*", default=[512, 2048])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    initialize_model_parallel(1, 1)
    max_context = max(args.contexts + args.generator_contexts) + args.steps + 2
    models = {name: build(name, args.hidden_size, max_context) for name in ("softmax", "supra")}
    rows = []
    print("| batch | context | softmax tok/s | SUPRA tok/s | speed SUPRA/softmax | KV cache MiB | SUPRA state MiB |")
    print("|---|---|---|---|---|---|---|")
    for batch in args.batches:
        for length in args.contexts:
            (soft_rate, soft_bytes), (supra_rate, supra_bytes) = (
                decode_rate(models[name], batch, length, args.steps) for name in ("softmax", "supra")
            )
            rows.append(
                {
                    "batch": batch,
                    "context": length,
                    "softmax_tokens_per_s": soft_rate,
                    "supra_tokens_per_s": supra_rate,
                    "softmax_state_bytes": soft_bytes,
                    "supra_state_bytes": supra_bytes,
                }
            )
            print(
                f"| {batch} | {length} | {soft_rate:.1f} | {supra_rate:.1f} | {supra_rate / soft_rate:.2f} | "
                f"{soft_bytes / 2**20:.2f} | {supra_bytes / 2**20:.3f} |",
                flush=True,
            )
    generator_rows = []
    if args.generator_contexts:
        print("\nThrough the generator (prompts of L and L - 1 tokens, greedy):")
        print("| batch | L | model | prefill tok/s | decode tok/s | context state MiB |")
        print("|---|---|---|---|---|---|")
    for batch in args.batches:
        for length in args.generator_contexts:
            for name in ("softmax", "supra"):
                prefill, decode, held = generator_rate(models[name], batch, length, args.steps)
                generator_rows.append(
                    {
                        "batch": batch,
                        "prompt_length": length,
                        "model": name,
                        "prefill_tokens_per_s": prefill,
                        "decode_tokens_per_s": decode,
                        "state_bytes": held,
                    }
                )
                print(
                    f"| {batch} | {length} | {name} | {prefill:.1f} | {decode:.1f} | {held / 2**20:.3f} |", flush=True
                )
    if args.json:
        args.json.write_text(json.dumps({"decode_steps": rows, "generator": generator_rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
