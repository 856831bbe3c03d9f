"""Hugging Face interop against transformers itself (tiny random models built locally, fp32, no downloads).

* import of Starcoder2, Llama (with and without biases) and Mistral, all GQA:
  our logits equal transformers' at TP=1 and TP=2; ``evaluate`` at TP=2
  measures transformers' validation loss; a TP=2 run continues from the import;
* export of our models (dense, LowRank, BlockDense, BlockShuffle, and a SwiGLU
  + RMSNorm + untied one): transformers' logits and greedy tokens equal ours,
  and importing the export gives back the same logits and the same tensors;
  a checkpoint saved at TP=2 exports through the command line;
* bad input fails naming the file or field, and leaves no half-written output.

All megatron work happens in torchrun workers (``tests/workers/hf_interop.py``):
one single-process launch, then one two-rank launch for every TP=2 check.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.mp_harness import REPO_ROOT, launch
from tests.workers import hf_interop as w
from tests.workers.train_checks import write_dataset

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf-interop")


@pytest.fixture(scope="module")
def single(root):
    checks = ["imports_match_transformers", "exports_match_ours", "export_failures"]
    run = launch(
        "tests.workers.hf_interop", checks, nproc=1, timeout=600, kwargs={c: {"root": str(root)} for c in checks}
    )
    return run.results[0]


@pytest.fixture(scope="module")
def data(root) -> Path:
    return write_dataset(root / "data", train_samples=16, val_samples=8, per_shard=8, seq=w.SEQ, vocab=w.VOCAB)


@pytest.fixture(scope="module")
def tp2(root, single, data):
    checks = ["imports_at_tp2", "save_structured_at_tp2", "evaluate_imported_at_tp2", "train_from_import_at_tp2"]
    kwargs = {c: {"root": str(root)} for c in checks}
    kwargs["evaluate_imported_at_tp2"]["data"] = kwargs["train_from_import_at_tp2"]["data"] = str(data)
    return launch("tests.workers.hf_interop", checks, nproc=2, timeout=600, kwargs=kwargs).results


# --------------------------------------------------------------------------- import


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("name", list(w.HF_MODELS))
def test_import_logits_equal_transformers_at_tp1(single, name):
    result = single["imports_match_transformers"][name]
    assert result["scale"] > 0.5  # logits of a model far from init, not all near zero
    assert result["diff"] <= TOLERANCE, result


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("name", list(w.HF_MODELS))
def test_import_logits_equal_transformers_at_tp2(tp2, name):
    for rank, results in enumerate(tp2):
        assert results["imports_at_tp2"][name] <= TOLERANCE, (rank, results["imports_at_tp2"])


@pytest.mark.multiproc
@pytest.mark.slow
def test_imported_model_configs_and_parameter_counts(single):
    results = single["imports_match_transformers"]
    assert results["starcoder2"]["model"] == {
        "normalization": "LayerNorm",
        "activation": "gelu",
        "linear_bias": True,
        "tie_embeddings": True,
        "rope_base": 5000.0,
        "num_query_groups": 2,
        "kv_channels": 16,
    }
    assert results["llama"]["model"] == {
        "normalization": "RMSNorm",
        "activation": "swiglu",
        "linear_bias": False,
        "tie_embeddings": False,
        "rope_base": 50000.0,
        "num_query_groups": 2,
        "kv_channels": 24,
    }
    assert results["llama-biases-tied"]["model"]["linear_bias"] is True
    for name, result in results.items():
        counted, built = result["params"]
        assert counted == built, f"{name}: accounting counts {counted} parameters, the model has {built}"
        assert result["files"] == ["checkpoints", "config.yaml", "tokenizer.json"], name


@pytest.mark.multiproc
@pytest.mark.slow
def test_evaluate_at_tp2_measures_transformers_loss(tp2):
    for results in tp2:
        losses = results["evaluate_imported_at_tp2"]
        assert abs(losses["ours"] - losses["hf"]) <= TOLERANCE * max(1.0, losses["hf"]), losses


@pytest.mark.multiproc
@pytest.mark.slow
def test_training_continues_from_an_import_at_tp2(tp2):
    for results in tp2:
        assert results["train_from_import_at_tp2"] <= 1e-3  # one step at lr 1e-7 from the imported weights


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("name", list(w.HF_MODELS))
def test_generator_on_an_import_equals_transformers_greedy(single, name):
    """Our KV-cache generator on the imported run dir, a batch of two prompt lengths, vs transformers' batch."""
    result = single["imports_match_transformers"][name]
    generated = result["generator"]
    assert generated["prompt_ids"] == w.GEN_PROMPTS and generated["eos_id"] == 1
    assert generated["token_ids"] == result["generator_hf"], result["generator_hf"]
    assert all(len(ids) > 0 for ids in generated["token_ids"])


@pytest.mark.multiproc
@pytest.mark.slow
def test_generate_command_on_an_imported_run_equals_transformers_greedy(single, root):
    """``python -m megatron_sffn.generate`` reads an import_hf run directory as written (no overrides)."""
    prompts = [arg for p in w.GEN_PROMPTS for arg in ("--prompt", w.prompt_text(p))]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_sffn.generate",
            str(root / "runs" / "llama"),
            *prompts,
            "--max-new-tokens",
            str(w.GEN_TOKENS),
            "--pre-merge",
            "off",
            "--json",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    expected = single["imports_match_transformers"]["llama"]["generator_hf"]
    assert [c["token_ids"] for c in report["completions"]] == expected


# --------------------------------------------------------------------------- export


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("name", list(w.OURS))
def test_export_logits_equal_ours(single, name):
    result = single["exports_match_ours"][name]
    assert result["scale"] > 0.5
    assert result["diff"] <= TOLERANCE, result
    expected = "LlamaForCausalLM" if "rmsnorm" in name else "Starcoder2ForCausalLM"
    assert result["architectures"] == [expected]
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(result["files"])


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("name", list(w.OURS))
def test_transformers_greedy_generation_equals_our_greedy_loop(single, name):
    result = single["exports_match_ours"][name]
    assert result["greedy_hf"].shape == result["greedy_ours"].shape == (2, 12)
    assert torch.equal(result["greedy_hf"], result["greedy_ours"])


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["on", "off"])
@pytest.mark.parametrize("name", list(w.OURS))
def test_transformers_greedy_generation_equals_our_kv_cache_generator(single, name, mode):
    """transformers' left-padded batch generate vs our TextGenerator (pre-merge on/off) on the same run dir."""
    result = single["exports_match_ours"][name]
    generated = result["generator"][mode]
    assert generated["prompt_ids"] == w.GEN_PROMPTS
    assert generated["token_ids"] == result["generator_hf"], result["generator_hf"]
    assert all(len(ids) > 0 for ids in generated["token_ids"])


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("name", list(w.OURS))
def test_import_of_export_round_trips(single, name):
    result = single["exports_match_ours"][name]
    assert result["roundtrip_logits"] <= TOLERANCE
    tensors = result["roundtrip_tensors"]
    assert tensors["names_equal"] and not tensors["differ"] and tensors["count"] > 20, tensors


@pytest.mark.multiproc
@pytest.mark.slow
def test_exported_tokenizer_loads_with_eos_and_bos(single, root):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(root / "export" / "dense"))
    special = (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.bos_token, tokenizer.bos_token_id)
    assert special == ("</s>", 1, "<s>", 0)
    assert tokenizer("w5 w17", add_special_tokens=False)["input_ids"] == [5, 17]
    generation = json.loads((root / "export" / "dense" / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (0, 1)


@pytest.mark.multiproc
@pytest.mark.slow
def test_tp2_checkpoint_exports_from_the_command_line(tp2, root):
    """Saved at TP=2, exported by ``python -m megatron_sffn.export_hf`` in one process, checked here."""
    run_dir, out = root / "tp2" / "blockdense", root / "tp2-export"
    done = subprocess.run(
        [sys.executable, "-m", "megatron_sffn.export_hf", str(run_dir), "--out", str(out), "--step", "0"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reference = torch.load(run_dir / "reference_logits.pt")
    assert (w.hf_logits(out) - reference).abs().max().item() <= TOLERANCE


# --------------------------------------------------------------------------- bad input


@pytest.mark.multiproc
@pytest.mark.slow
def test_failed_export_leaves_no_directory(single):
    result = single["export_failures"]
    assert result["midway_error"] == "simulated failure in the middle of the export"
    assert result["left_behind"] == []


@pytest.mark.multiproc
@pytest.mark.slow
def test_sharded_export_loads_and_a_shape_mismatch_names_tensor_and_file(single):
    result = single["export_failures"]
    assert "model.safetensors.index.json" in result["sharded_files"] and len(result["sharded_files"]) > 3
    assert result["sharded_diff"] == 0.0
    error = result["shape_error"]
    assert result["shard_name"] in error and "model.layers.1.mlp.c_fc.weight" in error and "[255, 64]" in error
    assert "config.json" in error
    assert not result["imported_exists"]


def _saved_hf_model(directory: Path, name: str = "llama", **config) -> Path:
    from transformers import AutoModelForCausalLM

    hf_config = w.hf_config(name)
    for key, value in config.items():
        setattr(hf_config, key, value)
    AutoModelForCausalLM.from_config(hf_config).save_pretrained(str(directory), max_shard_size="100KB")
    return directory


def test_missing_shard_is_named(tmp_path):
    from megatron_sffn.import_hf import main

    hf_dir = _saved_hf_model(tmp_path / "hf")
    shards = sorted(hf_dir.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match=shards[1].name):
        from megatron_sffn.import_hf import import_model

        import_model(hf_dir, tmp_path / "run")
    assert main([str(hf_dir), "--out", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()


def test_wrong_architecture_is_named(tmp_path, capsys):
    from megatron_sffn.import_hf import main

    (tmp_path / "hf").mkdir()
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert main([str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "model_type='gpt2'" in err and "starcoder2" in err


@pytest.mark.parametrize(
    "name, field, value, message",
    [
        ("llama", "rope_parameters", {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}, "rope_type"),
        ("mistral", "sliding_window", 16, "sliding_window=16"),
        ("llama", "mlp_bias", True, "attention_bias=False"),
        ("llama", "hidden_act", "gelu", "hidden_act='gelu'"),
        ("mistral", "num_local_experts", 4, "num_local_experts=4"),
    ],
)
def test_configs_we_cannot_compute_are_refused_naming_the_field(name, field, value, message):
    from megatron_sffn.hf.architectures import UnsupportedConfigError, model_config_from_hf

    hf_config = w.hf_config(name)
    setattr(hf_config, field, value)
    with pytest.raises(UnsupportedConfigError, match=message.replace("[", r"\[")) as info:
        model_config_from_hf(hf_config, "some/dir")
    assert "some/dir/config.json" in str(info.value)


def test_sliding_window_covering_the_chosen_context_is_accepted():
    from megatron_sffn.hf.architectures import model_config_from_hf

    hf_config = w.hf_config("mistral")
    hf_config.sliding_window = 16
    assert model_config_from_hf(hf_config, "d", seq_length=16).seq_length == 16


def test_export_refuses_an_architecture_without_a_transformers_twin():
    from megatron_sffn.config.model import ModelConfig
    from megatron_sffn.hf.architectures import UnsupportedConfigError, export_family

    cfg = ModelConfig(hidden_size=64, num_layers=2, num_attention_heads=4, activation="swiglu")
    with pytest.raises(UnsupportedConfigError, match="model.normalization='LayerNorm' with model.activation='swiglu'"):
        export_family(cfg)


def test_existing_output_directory_is_refused(tmp_path, capsys):
    from megatron_sffn import export_hf, import_hf

    (tmp_path / "out").mkdir()
    assert import_hf.main([str(tmp_path / "hf"), "--out", str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert export_hf.main([str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 2
    assert f"--out {tmp_path / 'out'} already exists" in capsys.readouterr().err
