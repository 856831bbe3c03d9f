"""Text generation: KV-cached decoding against full recomputation, TP layouts, pre-merge, the CLI.

One torchrun launch (2 gloo ranks) trains a tiny run at TP=2 with the
project's trainer and runs every multi-process check (see
``tests/workers/generate_checks.py``); the references are written there from
the definition (greedy decoding by recomputing the whole sequence).  Bad
input is checked in-process against a fake checkpoint that would fail to
load, so a refusal proves it came before the model.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from megatron_sffn import generate
from tests.mp_harness import launch
from tests.workers.generate_checks import tokenizer_file
from tests.workers.train_checks import REPO_ROOT, run_config, train_env, write_config, write_dataset

# Every structure with and without GQA, half at TP=1 and half at TP=2, so each layout meets every structure.
DECODE_CONFIGS = [
    ["dense", False, 2],
    ["dense", True, 1],
    ["lowrank", True, 2],
    ["lowrank", False, 1],
    ["blockdense", False, 2],
    ["blockdense", True, 1],
    ["blockshuffle", True, 2],
    ["blockshuffle", False, 1],
]
STRUCTURES = ["lowrank", "blockdense", "blockshuffle"]
# SUPRA (all layers linear) and a hybrid (layer 0 softmax with a KV cache, layer 1 SUPRA), GQA, at both TP sizes.
SUPRA_CONFIGS = [["all", "dense", 1], ["all", "lowrank", 2], [[1], "lowrank", 1], [[1], "dense", 2]]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict:
    """A run trained at TP=2 (its run dir and tokenizer) and the results of every multi-process check."""
    tmp = tmp_path_factory.mktemp("generate")
    dataset = write_dataset(tmp / "data")
    tokenizer = tokenizer_file(tmp / "tokenizer.json")
    training = {"micro_batch_size": 2, "global_batch_size": 4, "train_steps": 3, "seed": 11}
    config = run_config(tmp / "run", dataset, parallel={"tensor_parallel": 2}, training=training)
    config_path = write_config(tmp / "run.yaml", config)
    checks = [
        "train_run",
        "tp2_checkpoint_generates",
        "cached_equals_recompute",
        "sampling_is_reproducible",
        "pre_merge_modes",
        "supra_cached_equals_recompute",
    ]
    run = launch(
        "tests.workers.generate_checks",
        checks,
        nproc=2,
        timeout=600,
        kwargs={
            "train_run": {"config_path": str(config_path)},
            "tp2_checkpoint_generates": {"run_dir": str(tmp / "run"), "tokenizer": str(tokenizer)},
            "cached_equals_recompute": {"configs": DECODE_CONFIGS},
            "pre_merge_modes": {"structures": STRUCTURES},
            "supra_cached_equals_recompute": {"configs": SUPRA_CONFIGS},
        },
    )
    return {"run_dir": tmp / "run", "tokenizer": tokenizer, "results": run.results}


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("config", DECODE_CONFIGS, ids=lambda c: f"{c[0]}{'-gqa' if c[1] else ''}-tp{c[2]}")
def test_cached_decoding_equals_full_recompute(tiny_run, config):
    structure, gqa, tp = config
    result = tiny_run["results"][0]["cached_equals_recompute"][f"{structure}{'-gqa' if gqa else ''}-tp{tp}"]
    for variant in ("one_chunk", "chunked"):  # chunked: 2-token prefill chunks over a filled cache
        assert result[variant]["tokens_equal"], (variant, result)
        assert result[variant]["logits_close"], (variant, result[variant]["max_logit_diff"])
    assert result["eos_stops"], result
    assert len({tuple(t) for t in result["tokens"]}) > 1  # the prompts really lead to different text


def _supra_id(config: list) -> str:
    return f"{config[0]}-{config[1]}-tp{config[2]}"


def _supra_kind(config: list) -> str:
    return "supra" if config[0] == "all" else "hybrid"


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("config", SUPRA_CONFIGS, ids=lambda c: f"{_supra_kind(c)}-{c[1]}-tp{c[2]}")
def test_supra_cached_decoding_equals_full_recompute(tiny_run, config):
    """Recurrent state (and the hybrid's KV cache) vs recompute; pre-merge on a SUPRA model keeps the function."""
    result = tiny_run["results"][0]["supra_cached_equals_recompute"][_supra_id(config)]
    for variant in ("one_chunk", "chunked", "pre_merge_on"):
        assert result[variant]["tokens_equal"], (variant, result)
        assert result[variant]["logits_close"], (variant, result[variant]["max_logit_diff"])
    assert result["eos_stops"], result
    assert len({tuple(t) for t in result["tokens"]}) > 1
    assert result["supra_layers"] == (2 if config[0] == "all" else 1)
    assert result["structured_layers"] == (0 if config[1] == "dense" else 2)  # fc1 and fc2 of layer 1


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("config", SUPRA_CONFIGS, ids=lambda c: f"{_supra_kind(c)}-tp{c[2]}")
def test_supra_state_does_not_grow_with_generated_length(tiny_run, config):
    """Context memory = SUPRA states (batch x heads x d_k x d_v, fp32) + softmax KV caches (prompt + new tokens)."""
    result = tiny_run["results"][0]["supra_cached_equals_recompute"][_supra_id(config)]
    batch, head_dim, longest, tp = 3, 16, 9, config[2]
    linear, softmax = result["supra_layers"], 2 - result["supra_layers"]
    state = linear * batch * result["heads_per_rank"] * head_dim * head_dim * 4
    for new_tokens, held in result["state_bytes"].items():
        kv_cache = softmax * 2 * (longest + int(new_tokens)) * batch * (2 // tp) * head_dim * 4
        assert held == state + kv_cache, (new_tokens, held, state, kv_cache)
    if softmax == 0:
        assert len(set(result["state_bytes"].values())) == 1


@pytest.mark.multiproc
@pytest.mark.slow
def test_tensor_parallel_ranks_agree(tiny_run):
    first, second = tiny_run["results"]
    checks = (
        "supra_cached_equals_recompute",
        "cached_equals_recompute",
        "sampling_is_reproducible",
        "tp2_checkpoint_generates",
    )
    for check in checks:
        assert first[check] == second[check], check


@pytest.mark.multiproc
@pytest.mark.slow
def test_sampling_is_seeded(tiny_run):
    draws = tiny_run["results"][0]["sampling_is_reproducible"]
    assert draws["seed1"] == draws["seed1_again"]
    assert draws["seed1"] != draws["seed2"]
    assert draws["greedy"] == draws["greedy_other_seed"]
    assert draws["seed1"] != draws["greedy"]


@pytest.mark.multiproc
@pytest.mark.slow
def test_tp2_checkpoint_generates_the_same_at_tp1(tiny_run):
    result = tiny_run["results"][0]["tp2_checkpoint_generates"]
    assert result["tp2"] == result["tp1"]
    assert all(len(ids) >= 1 for ids in result["tp2"])
    assert result["tp2_text"] == result["tp1_text"]


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("structure", STRUCTURES)
def test_pre_merge_keeps_the_function(tiny_run, structure):
    result = tiny_run["results"][0]["pre_merge_modes"][structure]
    for mode, comparison in result["modes"].items():
        assert comparison["tokens_equal"], (mode, comparison)
        assert comparison["logits_close"], (mode, comparison)
    assert result["mixed_branches"] == (True, False)  # the mixed run really switched per call
    assert result["uses"]["off"]["bytes"] == 0
    for mode in ("on", "auto"):
        assert result["uses"][mode]["bytes"] == result["expected_bytes"] > 0
    assert not result["merged_in_checkpoint"]


@pytest.mark.multiproc
@pytest.mark.slow
def test_cli_json_matches_the_api(tiny_run):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_sffn.generate",
            str(tiny_run["run_dir"]),
            "--tokenizer",
            str(tiny_run["tokenizer"]),
            "--prompt",
            "t5 t6 t7",
            "--prompt",
            "t40 t41 t42 t43 t44 t45",
            "--prompt",
            "t100",
            "--max-new-tokens",
            "6",
            "--pre-merge",
            "on",
            "--json",
        ],
        cwd=REPO_ROOT,
        env=train_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout)
    expected = tiny_run["results"][0]["tp2_checkpoint_generates"]["tp1"]
    assert [c["token_ids"] for c in report["completions"]] == expected
    assert all(isinstance(t, int) for c in report["completions"] for t in c["token_ids"])
    assert [c["text"] for c in report["completions"]] == tiny_run["results"][0]["tp2_checkpoint_generates"]["tp1_text"]
    assert report["prefill_tokens_per_s"] > 0 and report["decode_tokens_per_s"] > 0
    assert report["pre_merge"]["mode"] == "on" and report["pre_merge"]["extra_bytes_per_rank"] > 0
    assert "Warning" not in done.stderr, done.stderr[-4000:]  # megatron's harmless import-time warnings are silenced


# ---------------------------------------------------------------------------
# bad input, refused before the model loads


@pytest.mark.multiproc
@pytest.mark.slow
def test_closed_stdout_stops_without_a_traceback(tiny_run):
    """``generate ... | head``: the reader leaves before the text comes; the command stops quietly."""
    command = [sys.executable, "-m", "megatron_sffn.generate", str(tiny_run["run_dir"])]
    command += ["--tokenizer", str(tiny_run["tokenizer"]), "--prompt", "t5 t6 t7", "--max-new-tokens", "4"]
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    process.stdout.close()  # nothing reads the completion
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1, stderr[-4000:]
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr[-4000:]


@pytest.fixture
def fake_run(tmp_path) -> Path:
    """A run directory whose checkpoint is only a name: loading it would fail, so only checks may run."""
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_0000005"
    step.mkdir(parents=True)
    (step / "metadata.json").write_text("{}")
    (run / "checkpoints" / "latest").write_text("step_0000005\n")
    config = run_config(run, tmp_path / "data")
    config["model"]["seq_length"] = 8
    (step / "config.yaml").write_text(yaml.safe_dump(config))
    tokenizer_file(tmp_path / "tokenizer.json")
    return run


def _refusal(capsys, fake_run: Path, *args: str) -> str:
    argv = [str(fake_run), "--tokenizer", str(fake_run.parent / "tokenizer.json"), *args]
    assert generate.main(argv) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "", "--max-new-tokens", "2"], "prompt 0 is empty"),
        (["--prompt", "t1", "--prompt", " ", "--max-new-tokens", "2"], "prompt 1 is empty (no tokens)"),
        (
            ["--prompt", " ".join(f"t{i}" for i in range(1, 10)), "--max-new-tokens", "1"],
            "prompt 0 has 9 tokens, longer than the model's context of 8",
        ),
        (
            ["--prompt", "t1 t2 t3", "--max-new-tokens", "6"],
            "3 tokens + max_new_tokens=6 = 9 exceeds the model's context of 8",
        ),
        (["--prompt", "t1", "--max-new-tokens", "2", "--temperature", "-0.5"], "temperature=-0.5 must be >= 0"),
        (["--prompt", "t1", "--max-new-tokens", "2", "--top-p", "0"], "top_p=0.0 must be in (0, 1]"),
        (["--prompt", "t1", "--max-new-tokens", "2", "--top-p", "1.5"], "top_p=1.5 must be in (0, 1]"),
        (["--prompt", "t1", "--max-new-tokens", "2", "--top-k", "-1"], "top_k=-1 must be >= 0"),
        (["--prompt", "t1", "--max-new-tokens", "0"], "max_new_tokens=0 must be at least 1"),
        (["--prompt", "t1", "--max-new-tokens", "2", "--step", "7"], "has no checkpoint of step 7"),
        (["--prompt", "t1", "--max-new-tokens", "2", "--pipeline-parallel", "2"], "pipeline_parallel=2"),
        (
            ["--prompt", "t1", "--max-new-tokens", "2", "--tensor-parallel", "2"],
            "must be >= 1 and divide the world size 1",
        ),
    ],
)
def test_bad_input_is_refused_naming_the_value(capsys, fake_run, args, message):
    assert message in _refusal(capsys, fake_run, *args)


def test_run_dir_without_checkpoint_is_refused(capsys, tmp_path):
    (tmp_path / "empty_run").mkdir()
    assert generate.main([str(tmp_path / "empty_run"), "--prompt", "x", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert "empty_run" in err and "checkpoints/latest" in err


def test_missing_relative_tokenizer_of_the_run_names_the_directory_it_was_read_from(
    capsys, fake_run, tmp_path, monkeypatch
):
    """A run records its tokenizer path as written; from another directory the error says where it looked."""
    config_file = fake_run / "checkpoints" / "step_0000005" / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    config["data"]["tokenizer"] = "data/tokenizer.json"
    config_file.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    assert generate.main([str(fake_run), "--prompt", "t1", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert "tokenizer file data/tokenizer.json does not exist" in err
    assert f"read from the current directory {tmp_path}" in err and "(--tokenizer)" in err


def test_prompt_file_blank_line_is_refused(capsys, fake_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("t1 t2\n\nt3\n")
    err = _refusal(capsys, fake_run, "--prompt-file", str(prompts), "--max-new-tokens", "1")
    assert f"{prompts}: line 2 is blank" in err


def test_stream_printer_shows_prompts_in_order_as_tokens_arrive():
    """Row 1 finishes first: its text waits until row 0 is done, then appears at once; row 0 streams live."""
    words = {1: " a", 2: " b", 3: " c", 0: ""}
    fake = SimpleNamespace(decode=lambda ids: "".join(words[i] for i in ids if i != 0))
    out = io.StringIO()
    printer = generate.StreamPrinter(fake, ["P0", "P1"], out)
    printer.on_step([(0, 1, False), (1, 2, False)])
    assert out.getvalue() == "--- [0] P0 a"
    printer.on_step([(0, 3, False), (1, 0, True)])
    assert out.getvalue() == "--- [0] P0 a c"
    printer.on_step([(0, 2, True)])
    assert out.getvalue() == "--- [0] P0 a c b\n--- [1] P1 b\n"
    printer.close()
    assert out.getvalue().endswith("--- [1] P1 b\n")
