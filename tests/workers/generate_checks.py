"""Generation checks run inside torchrun workers (see ``tests/mp_harness.py``).

The reference for every cached decode is written here from the definition:
greedy decoding that recomputes the whole sequence (prompt + tokens so far)
with a plain ``GPTModel.forward`` for each new token, one prompt at a time,
no inference context, no padding.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from megatron_sffn.config import ModelConfig
from megatron_sffn.inference import Decoder, SamplingParams, apply_pre_merge, structured_linears
from megatron_sffn.model import build_gpt_model, initialize_model_parallel, seed_model_parallel
from tests.mp_harness import scratch_dir
from tests.workers.model_parallel import STRUCTURES

TINY = dict(hidden_size=64, num_layers=2, num_attention_heads=4, vocab_size=128, seq_length=32, init_std=0.25)
PROMPTS = [[5, 17, 99, 3, 64], [42, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9]]  # different lengths
# Shortest 6, so 2-token prefill chunks run at offsets 2 and 4 over a filled cache.
LONG_PROMPTS = [[9, 8, 7, 6, 5, 4, 3], [11, 22, 33, 44, 55, 66], [2, 4, 6, 8, 10, 12, 14, 16, 18]]
NEW_TOKENS = 6


def _world() -> int:
    return int(os.environ["WORLD_SIZE"])


def tiny_model(structure: str, gqa: bool, tp: int, seed: int = 1234, supra_layers: str | list[int] | None = None):
    """This rank's shard of a tiny GPT (layer 0 dense, the others ``structure``), in eval mode.

    ``supra_layers``: None for softmax attention, ``"all"`` or a list of 0-based layers for SUPRA
    (chunk 4, so prefills of 5 to 9 tokens cross chunk boundaries).
    """
    initialize_model_parallel(tp, 1)
    seed_model_parallel(seed)
    attention = (
        {}
        if supra_layers is None
        else {
            "attention": "supra",
            "supra": {"chunk_size": 4, "layers": None if supra_layers == "all" else supra_layers},
        }
    )
    cfg = ModelConfig(
        **TINY, num_query_groups=2 if gqa else None, **attention, ffn={"structure": structure, **STRUCTURES[structure]}
    )
    model = build_gpt_model(cfg)
    # Random biases, so that a bias applied twice or not at all would show.
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                full = torch.randn(param.shape, generator=generator) * 0.02
                param.copy_(full)
    return model.eval()


@torch.no_grad()
def last_logits(model, sequence: list[int]) -> torch.Tensor:
    tokens = torch.tensor([sequence])
    positions = torch.arange(len(sequence)).unsqueeze(0)
    return model(tokens, positions, None, runtime_gather_output=True)[0, -1].float()


@torch.no_grad()
def recompute_greedy(model, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    sequence, logits = list(prompt), []
    for _ in range(steps):
        logits.append(last_logits(model, sequence))
        sequence.append(int(logits[-1].argmax()))
    return sequence[len(prompt) :], logits


def _compare(output, references) -> dict[str, Any]:
    """Tokens identical; logits at every generated step close in fp32 (rtol = atol = 1e-5)."""
    tokens_equal, logits_close, worst = True, True, 0.0
    for completion, (ref_tokens, ref_logits) in zip(output.completions, references, strict=True):
        tokens_equal &= completion.token_ids == ref_tokens
        if len(completion.logits) != len(ref_logits):
            return {"tokens_equal": False, "logits_close": False, "max_logit_diff": float("inf")}
        for got, want in zip(completion.logits, ref_logits, strict=True):
            worst = max(worst, float((got - want).abs().max()))
            logits_close &= torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    return {"tokens_equal": tokens_equal, "logits_close": logits_close, "max_logit_diff": worst}


def cached_equals_recompute(configs: list[list]) -> dict[str, Any]:
    """Per (structure, gqa, tp): one-chunk prefill, 2-token chunks over the cache, the EOS stop, vs recompute."""
    return {
        f"{structure}{'-gqa' if gqa else ''}-tp{tp}": _decode_vs_recompute(tiny_model(structure, gqa, tp))
        for structure, gqa, tp in configs
    }


def supra_cached_equals_recompute(configs: list[list]) -> dict[str, Any]:
    """Per (SUPRA layers, structure, tp): the checks of :func:`cached_equals_recompute`, plus pre-merge `on`
    against `off`, and the state held in the context for a short and a long generation."""
    results = {}
    for supra_layers, structure, tp in configs:
        model = tiny_model(structure, True, tp, supra_layers=supra_layers)
        result = _decode_vs_recompute(model)
        params = SamplingParams(max_new_tokens=NEW_TOKENS)
        decoder = Decoder(model, eos_id=None, context_length=32)
        plain = decoder.generate(PROMPTS, params, keep_logits=True)
        apply_pre_merge(model, "on")
        merged = decoder.generate(PROMPTS, params, keep_logits=True)
        apply_pre_merge(model, "off")
        result["pre_merge_on"] = _compare(merged, [(c.token_ids, c.logits) for c in plain.completions])
        result["structured_layers"] = len(structured_linears(model))
        result["state_bytes"] = {
            n: decoder.generate(PROMPTS, SamplingParams(max_new_tokens=n)).state_bytes for n in (2, 20)
        }
        result["supra_layers"] = sum(
            type(layer.self_attention).__name__ == "SupraSelfAttention" for layer in model.decoder.layers
        )
        result["heads_per_rank"] = model.decoder.layers[0].self_attention.num_attention_heads_per_partition
        results[f"{supra_layers}-{structure}-tp{tp}"] = result
    return results


def _decode_vs_recompute(model) -> dict[str, Any]:
    """One-chunk prefill, 2-token chunks over the cache and the EOS stop of ``model`` against recompute."""
    references = [recompute_greedy(model, p, NEW_TOKENS) for p in PROMPTS]
    params = SamplingParams(max_new_tokens=NEW_TOKENS)
    one_chunk = Decoder(model, eos_id=None, context_length=32).generate(PROMPTS, params, keep_logits=True)
    chunked = Decoder(model, eos_id=None, context_length=32, prefill_chunk=2)
    chunked_output = chunked.generate(LONG_PROMPTS, params, keep_logits=True)
    long_references = [recompute_greedy(model, p, NEW_TOKENS) for p in LONG_PROMPTS]
    eos = references[0][0][3]  # prompt 0's 4th greedy token ends prompt 0 there
    stopped = Decoder(model, eos_id=eos, context_length=32).generate(PROMPTS, params)
    expected_stops = []
    for tokens, _ in references:
        cut = tokens.index(eos) + 1 if eos in tokens else len(tokens)
        expected_stops.append((tokens[:cut], "eos" if eos in tokens else "length"))
    return {
        "one_chunk": _compare(one_chunk, references),
        "chunked": _compare(chunked_output, long_references),
        "eos_stops": [(c.token_ids, c.finish_reason) for c in stopped.completions] == expected_stops,
        "tokens": [c.token_ids for c in one_chunk.completions],
    }


def sampling_is_reproducible() -> dict[str, Any]:
    """Same seed, same draws (on every rank); another seed, other draws; temperature 0 ignores the seed."""
    model = tiny_model("lowrank", True, _world())
    decoder = Decoder(model, eos_id=None, context_length=32)

    def draw(seed: int, temperature: float = 1.5) -> list[list[int]]:
        params = SamplingParams(max_new_tokens=12, temperature=temperature, top_k=50, top_p=0.95, seed=seed)
        return [c.token_ids for c in decoder.generate(PROMPTS, params).completions]

    return {
        "seed1": draw(1),
        "seed1_again": draw(1),
        "seed2": draw(2),
        "greedy": draw(1, 0.0),
        "greedy_other_seed": draw(2, 0.0),
    }


def pre_merge_modes(structures: list[str]) -> dict[str, Any]:
    """off / on / auto / a threshold between decode and prefill sizes: equal logits and tokens; nothing saved."""
    tp = _world()
    cache = scratch_dir() / f"premerge-cache-{os.environ['RANK']}"  # one per rank: rank 0's verdict rules
    results = {}
    params = SamplingParams(max_new_tokens=NEW_TOKENS)
    for structure in structures:
        model = tiny_model(structure, True, tp)
        decoder = Decoder(model, eos_id=None, context_length=32)
        runs, uses = {}, {}
        for mode in ("off", "on", "auto", "mixed"):
            report = apply_pre_merge(
                model, "on" if mode == "mixed" else mode, cache_dir=cache, calibration_max_tokens=64
            )
            if mode == "mixed":  # decode steps (3 tokens) merged, prefill (6 tokens) structured
                for layer in structured_linears(model):
                    layer.merge_threshold = len(PROMPTS)
                decode_merged = all(layer.uses_merged(len(PROMPTS)) for layer in structured_linears(model))
                prefill_merged = any(layer.uses_merged(2 * len(PROMPTS)) for layer in structured_linears(model))
            runs[mode] = decoder.generate(PROMPTS, params, keep_logits=True)
            uses[mode] = {"bytes": report.extra_bytes, "thresholds": sorted(set(report.thresholds.values()))}
        reference = [(c.token_ids, c.logits) for c in runs["off"].completions]
        state_keys = list(model.state_dict()) + list(model.sharded_state_dict())
        layers = structured_linears(model)
        expected_bytes = sum(layer.input_size * layer.output_size // tp * 4 for layer in layers)
        results[structure] = {
            "modes": {mode: _compare(runs[mode], reference) for mode in ("on", "auto", "mixed")},
            "uses": uses,
            "expected_bytes": expected_bytes,
            "merged_in_checkpoint": any("merged" in key for key in state_keys),
            "structured_layers": len(layers),
            "mixed_branches": (decode_merged, prefill_merged),
        }
    return results


def train_run(config_path: str) -> str:
    """Train the run of ``config_path`` with the project's trainer, in this launch; returns its run dir."""
    from megatron_sffn.config.loading import load_config
    from megatron_sffn.config.train import TrainConfig
    from megatron_sffn.training.loop import run_training

    config = load_config(TrainConfig, config_path)
    run_training(config)
    return config.run_dir


def tp2_checkpoint_generates(run_dir: str, tokenizer: str) -> dict[str, Any]:
    """A run trained and saved at TP=2 generates the same greedy text at TP=2 and at TP=1."""
    from megatron_sffn.inference import TextGenerator, plan_generation

    prompts = ["t5 t6 t7", "t40 t41 t42 t43 t44 t45", "t100"]
    params = SamplingParams(max_new_tokens=6)
    results = {}
    for tp in (2, 1):
        plan = plan_generation(run_dir, tokenizer=tokenizer, tensor_parallel=tp)
        generator = TextGenerator.load(plan, pre_merge="off")
        completions, _ = generator.generate(prompts, params)
        results[f"tp{tp}"] = [c.token_ids for c in completions]
        results[f"tp{tp}_text"] = [c.text for c in completions]
    return results


def tokenizer_file(path: Path) -> Path:
    """A word-level tokenizer.json of 128 tokens: ``<|endoftext|>`` (id 0) and ``t1`` ... ``t127``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, **{f"t{i}": i for i in range(1, 128)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.save(str(path))
    return path
