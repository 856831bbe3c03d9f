"""Checks of the Hugging Face interop that need megatron in a torchrun process (see tests/test_hf_interop.py).

transformers' own models are the reference: tiny random ones built here from
transformers config classes (no downloads), and transformers' loading of our
exports.  Our side is always computed by our GPTModel's full forward.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

VOCAB = 96
SEQ = 64
# A batch of prompts of different lengths for the generators (word-level tokens, none special).
GEN_PROMPTS = [[5, 17, 3, 88], [9, 61, 33, 70, 11, 95, 42]]
GEN_TOKENS = 8
PROBE = torch.tensor([[5, 17, 3, 88, 42, 9, 61, 2, 33, 70, 11, 95], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])

# Tiny transformers configs, GQA in each; rope bases off the default so that rope_base is carried.
HF_MODELS: dict[str, dict[str, Any]] = {
    "starcoder2": dict(
        model_type="starcoder2",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        use_bias=True,
        norm_epsilon=1e-5,
        tie_word_embeddings=True,
        sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    ),
    "llama": dict(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        intermediate_size=96,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
    ),
    "llama-biases-tied": dict(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
    ),
    "mistral": dict(
        model_type="mistral",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=96,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        sliding_window=SEQ,
        rope_parameters={"rope_type": "default", "rope_theta": 20000.0},
    ),
}

# Our models to export: the paper's architecture, dense and each structure.
OURS: dict[str, dict[str, Any]] = {
    "dense": dict(ffn={"structure": "dense"}),
    "lowrank": dict(ffn={"structure": "lowrank", "rank": 16}),
    "blockdense": dict(ffn={"structure": "blockdense", "rank": 32, "blocks": 2}),
    "blockshuffle": dict(ffn={"structure": "blockshuffle", "blocks": 4}),
    "swiglu-rmsnorm-untied": dict(
        activation="swiglu",
        normalization="RMSNorm",
        linear_bias=False,
        tie_embeddings=False,
        ffn={"structure": "lowrank", "rank": 16},
    ),
}
OUR_BASE = dict(
    hidden_size=64,
    num_layers=3,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=256,
    vocab_size=VOCAB,
    seq_length=SEQ,
)


def hf_config(name: str):
    from transformers import AutoConfig

    spec = dict(HF_MODELS[name])
    return AutoConfig.for_model(
        spec.pop("model_type"), vocab_size=VOCAB, max_position_embeddings=SEQ, bos_token_id=0, eos_token_id=1, **spec
    )


def write_tokenizer(directory: Path) -> None:
    """A word-level tokenizer of VOCAB tokens with <s> and </s>, saved the way transformers saves one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(directory))


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Every parameter away from its init (biases and norms too), so that each one's mapping is tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)


def build_hf_model(name: str, directory: Path, seed: int = 0) -> torch.Tensor:
    """Save a tiny random transformers model of ``name`` (safetensors + tokenizer); returns its probe logits."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(name), dtype=torch.float32).eval()
    randomize_(model, seed)
    model.save_pretrained(str(directory))
    write_tokenizer(directory)
    with torch.no_grad():
        return model(PROBE).logits


def hf_logits(directory: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(PROBE).logits


def our_logits(model, tokens: torch.Tensor = PROBE) -> torch.Tensor:
    """Full-vocabulary logits of our GPTModel (gathered over tensor-parallel ranks)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        logits = model(tokens, positions, attention_mask=None)
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        logits = gather_from_tensor_model_parallel_region(logits)
    return logits


def load_run(run_dir: Path, tp: int):
    """Our model of a run directory at ``tp``, its latest checkpoint loaded."""
    import yaml

    from megatron_sffn.config.loading import from_dict
    from megatron_sffn.config.model import ModelConfig
    from megatron_sffn.model import build_gpt_model, initialize_model_parallel, seed_model_parallel
    from megatron_sffn.training.checkpointing import CONFIG_FILE, load_checkpoint, resolve_checkpoint

    checkpoint = resolve_checkpoint(run_dir)
    cfg = from_dict(ModelConfig, yaml.safe_load((checkpoint / CONFIG_FILE).read_text())["model"])
    initialize_model_parallel(tp, 1)
    seed_model_parallel(1)
    model = build_gpt_model(cfg, backend="local").eval()
    load_checkpoint(checkpoint, model=[model])
    return model, cfg


def our_greedy(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding by full recomputation: argmax of the last position's logits, appended, repeated."""
    tokens = prompt
    for _ in range(new_tokens):
        tokens = torch.cat([tokens, our_logits(model, tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


def hf_greedy(directory: Path, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    # No stop token: our loop does not stop either (and min_new_tokens would forbid EOS instead).
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        return model.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=new_tokens
        )


def prompt_text(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


def generator_greedy(run_dir: Path, model, mode: str) -> dict[str, Any]:
    """Our KV-cache TextGenerator on ``run_dir``'s plan and this loaded model: greedy ids of GEN_PROMPTS."""
    from megatron_sffn.inference import SamplingParams, TextGenerator, apply_pre_merge, plan_generation

    plan = plan_generation(run_dir, world_size=1)
    generator = TextGenerator(plan, model, apply_pre_merge(model, mode), prefill_chunk=None)
    texts = [prompt_text(p) for p in GEN_PROMPTS]
    completions, _ = generator.generate(texts, SamplingParams(max_new_tokens=GEN_TOKENS))
    return {
        "prompt_ids": plan.encode(texts, GEN_TOKENS),
        "eos_id": plan.tokenizer.eos_id,
        "token_ids": [c.token_ids for c in completions],
    }


def hf_greedy_batch(directory: Path) -> list[list[int]]:
    """transformers' greedy continuations of GEN_PROMPTS in one left-padded batch, stopping at its EOS."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    longest = max(len(p) for p in GEN_PROMPTS)
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in GEN_PROMPTS])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in GEN_PROMPTS])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=GEN_TOKENS, pad_token_id=eos)
    continuations = []
    for row in out[:, longest:].tolist():
        continuations.append(row[: row.index(eos) + 1] if eos in row else row)
    return continuations


def save_our_model(name: str, run_dir: Path, tp: int, seed: int) -> torch.Tensor:
    """Build our model ``name`` at ``tp``, randomise it, save a weights checkpoint in ``run_dir``; its logits."""
    from megatron_sffn.config.loading import from_dict, save_config, to_dict
    from megatron_sffn.config.model import ModelConfig
    from megatron_sffn.config.train import TrainConfig
    from megatron_sffn.model import build_gpt_model, initialize_model_parallel, seed_model_parallel
    from megatron_sffn.training.checkpoint_dirs import CheckpointDirs
    from megatron_sffn.training.checkpointing import CHECKPOINTS_SUBDIR, CONFIG_FILE, save_weights_checkpoint

    cfg = ModelConfig(**{**OUR_BASE, **OURS[name]})
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = run_dir / "tok"
    if int(os.environ.get("RANK", "0")) == 0:
        write_tokenizer(tokenizer_dir)
    config = from_dict(
        TrainConfig,
        {
            "run_dir": str(run_dir),
            "model": to_dict(cfg),
            "data": {"path": str(run_dir / "data"), "tokenizer": str(tokenizer_dir / "tokenizer.json")},
            "training": {"micro_batch_size": 1, "global_batch_size": 1, "train_steps": 1},
        },
    )
    initialize_model_parallel(tp, 1)
    seed_model_parallel(seed)
    model = build_gpt_model(cfg, backend="local").eval()
    randomize_(model, seed)
    save_weights_checkpoint(CheckpointDirs(run_dir / CHECKPOINTS_SUBDIR), config=config, model=[model])
    if int(os.environ.get("RANK", "0")) == 0:
        save_config(config, run_dir / CONFIG_FILE)
    return our_logits(model)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() if a.shape == b.shape else float("inf")


def _same_tensors(a: Path, b: Path) -> dict[str, Any]:
    """Whether two exported directories hold the same tensor names and values (and which differ)."""
    from safetensors.torch import load_file

    left, right = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    differ = sorted(n for n in left if n not in right or not torch.equal(left[n], right[n]))
    return {"names_equal": set(left) == set(right), "differ": differ, "count": len(left)}


# --------------------------------------------------------------------------- checks (one process)


def imports_match_transformers(root: str) -> dict[str, dict[str, Any]]:
    """Import each tiny transformers model; our TP=1 logits against transformers'."""
    from megatron_sffn.accounting.model import count_parameters
    from megatron_sffn.import_hf import import_model

    out = {}
    for name in HF_MODELS:
        hf_dir, run_dir = Path(root) / "hf" / name, Path(root) / "runs" / name
        reference = build_hf_model(name, hf_dir, seed=len(name))
        torch.save(reference, hf_dir / "reference_logits.pt")
        import_model(hf_dir, run_dir)
        model, cfg = load_run(run_dir, tp=1)
        out[name] = {
            "diff": _max_diff(our_logits(model), reference),
            "scale": reference.abs().max().item(),
            "params": (count_parameters(cfg).total, sum(p.numel() for p in model.parameters())),
            "model": {
                k: getattr(cfg, k)
                for k in (
                    "normalization",
                    "activation",
                    "linear_bias",
                    "tie_embeddings",
                    "rope_base",
                    "num_query_groups",
                    "kv_channels",
                )
            },
            "files": sorted(p.name for p in run_dir.iterdir()),
            "generator": generator_greedy(run_dir, model, "off"),
            "generator_hf": hf_greedy_batch(hf_dir),
        }
    return out


def exports_match_ours(root: str, new_tokens: int = 8) -> dict[str, dict[str, Any]]:
    """Export each of our models; transformers' logits and greedy tokens against ours; import round trip."""
    from megatron_sffn.export_hf import export_checkpoint
    from megatron_sffn.import_hf import import_model

    out = {}
    for i, name in enumerate(OURS):
        run_dir, hf_dir = Path(root) / "ours" / name, Path(root) / "export" / name
        ours = save_our_model(name, run_dir, tp=1, seed=100 + i)
        model, _ = load_run(run_dir, tp=1)
        ours_greedy = our_greedy(model, PROBE[:, :4], new_tokens)
        generated = {mode: generator_greedy(run_dir, model, mode) for mode in ("on", "off")}
        export_checkpoint(run_dir / "checkpoints" / "step_0000000", hf_dir)
        back_dir, again_dir = Path(root) / "back" / name, Path(root) / "again" / name
        import_model(hf_dir, back_dir)
        back, _ = load_run(back_dir, tp=1)
        back_logits = our_logits(back)
        export_checkpoint(back_dir, again_dir)
        config = json.loads((hf_dir / "config.json").read_text())
        out[name] = {
            "diff": _max_diff(hf_logits(hf_dir), ours),
            "scale": ours.abs().max().item(),
            "greedy_ours": ours_greedy,
            "greedy_hf": hf_greedy(hf_dir, PROBE[:, :4], new_tokens),
            "generator": generated,
            "generator_hf": hf_greedy_batch(hf_dir),
            "roundtrip_logits": _max_diff(back_logits, ours),
            "roundtrip_tensors": _same_tensors(hf_dir, again_dir),
            "architectures": config["architectures"],
            "files": sorted(p.name for p in hf_dir.iterdir()),
        }
    return out


def export_failures(root: str) -> dict[str, Any]:
    """A failure midway leaves nothing named --out; a config/weights shape mismatch names tensor and file."""
    import megatron_sffn.hf.weights as weights
    from megatron_sffn.export_hf import export_checkpoint
    from megatron_sffn.import_hf import import_model

    root_path = Path(root)
    run_dir = root_path / "ours" / "dense"  # written by exports_match_ours
    out_dir = root_path / "failing" / "model"
    original = weights.export_tensors

    def failing(*args, **kwargs):
        for count, item in enumerate(original(*args, **kwargs)):
            if count == 5:
                raise RuntimeError("simulated failure in the middle of the export")
            yield item

    weights.export_tensors = failing
    try:
        export_checkpoint(run_dir, out_dir, max_shard_bytes=4096)
        midway = "no error"
    except RuntimeError as exc:
        midway = str(exc)
    finally:
        weights.export_tensors = original
    result = {"midway_error": midway, "left_behind": sorted(p.name for p in out_dir.parent.iterdir())}

    # A sharded export (small shard limit) loads back; then corrupt one tensor's shape.
    sharded = root_path / "sharded" / "model"
    export_checkpoint(run_dir, sharded, max_shard_bytes=64 * 1024)
    result["sharded_files"] = sorted(p.name for p in sharded.iterdir() if "safetensors" in p.name)
    result["sharded_diff"] = _max_diff(hf_logits(sharded), hf_logits(root_path / "export" / "dense"))
    from safetensors.torch import load_file, save_file

    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard = sharded / index["weight_map"]["model.layers.1.mlp.c_fc.weight"]
    tensors = load_file(str(shard))
    tensors["model.layers.1.mlp.c_fc.weight"] = tensors["model.layers.1.mlp.c_fc.weight"][:-1]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    try:
        import_model(sharded, root_path / "failing" / "imported")
        result["shape_error"] = "no error"
    except ValueError as exc:
        result["shape_error"] = str(exc)
    result["shard_name"] = shard.name
    result["imported_exists"] = (root_path / "failing" / "imported").exists()
    return result


# --------------------------------------------------------------------------- checks (two processes)


def imports_at_tp2(root: str) -> dict[str, float]:
    """The imported runs at TP=2 against the transformers logits saved by imports_match_transformers."""
    out = {}
    for name in HF_MODELS:
        model, _ = load_run(Path(root) / "runs" / name, tp=2)
        out[name] = _max_diff(our_logits(model), torch.load(Path(root) / "hf" / name / "reference_logits.pt"))
    return out


def save_structured_at_tp2(root: str, name: str = "blockdense") -> torch.Tensor:
    """A TP=2 checkpoint of one of our structured models (exported afterwards in one process)."""
    logits = save_our_model(name, Path(root) / "tp2" / name, tp=2, seed=7)
    if int(os.environ["RANK"]) == 0:
        torch.save(logits, Path(root) / "tp2" / name / "reference_logits.pt")
    return logits


def _validation_rows(data: str) -> torch.Tensor:
    import numpy as np

    from megatron_sffn.data.loader import open_dataset
    from megatron_sffn.data.tar_shards import SampleFormat, read_shard, split_shards

    manifest = open_dataset(data)
    rows = [read_shard(spec, SampleFormat.of(manifest)) for spec in split_shards(manifest, "validation")]
    return torch.from_numpy(np.concatenate(rows).astype("int64"))


def _hf_mean_loss(hf_dir: Path, rows: torch.Tensor) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(rows[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1)).item()


def evaluate_imported_at_tp2(root: str, data: str, name: str = "mistral") -> dict[str, float]:
    """``evaluate`` of an imported run at TP=2 against transformers' loss on the same validation tokens."""
    from megatron_sffn.config.loading import load_config
    from megatron_sffn.config.train import TrainConfig
    from megatron_sffn.evaluate import evaluate_checkpoint
    from megatron_sffn.training.checkpointing import CONFIG_FILE, check_same_model, resolve_checkpoint

    checkpoint = resolve_checkpoint(Path(root) / "runs" / name)
    overrides = [
        f"data.path={data}",
        "data.tokenizer=null",
        "parallel.tensor_parallel=2",
        "eval.max_batches=null",
        "training.micro_batch_size=2",
        "training.global_batch_size=4",
    ]
    config = load_config(TrainConfig, checkpoint / CONFIG_FILE, overrides)
    check_same_model(checkpoint, config)
    report = evaluate_checkpoint(checkpoint, config)
    return {"ours": report["val_loss"], "hf": _hf_mean_loss(Path(root) / "hf" / name, _validation_rows(data))}


def train_from_import_at_tp2(root: str, data: str, name: str = "llama") -> float:
    """Continued pretraining from an imported run (``checkpoint.load``) at TP=2, one step at a tiny LR.

    Returns how far the trained model's logits are from transformers' (the
    weights moved by at most the tiny step, so a run that did not start from
    the import would be far off).
    """
    from megatron_sffn.config.loading import load_config
    from megatron_sffn.config.train import TrainConfig
    from megatron_sffn.training.loop import run_training

    imported = Path(root) / "runs" / name
    run_dir = Path(root) / "continued" / name
    overrides = [
        f"run_dir={run_dir}",
        f"data.path={data}",
        "data.tokenizer=null",
        f"checkpoint.load={imported}",
        "parallel.tensor_parallel=2",
        "training.micro_batch_size=2",
        "training.global_batch_size=4",
        "training.train_steps=1",
        "optimizer.lr=1e-7",
        "optimizer.warmup_fraction=0.0",
        "eval.at_end=false",
        "eval.interval=null",
        "logging.tensorboard=false",
        "checkpoint.save_interval=1",
    ]
    run_training(load_config(TrainConfig, imported / "config.yaml", overrides))
    model, _ = load_run(run_dir, tp=2)
    return _max_diff(our_logits(model), torch.load(Path(root) / "hf" / name / "reference_logits.pt"))
