"""The shipped SUPRA uptraining configs (``configs/supra/``) hold the paper's recipe and start from real runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from megatron_sffn.config.loading import load_config, load_yaml_mapping
from megatron_sffn.config.train import TrainConfig
from megatron_sffn.planning.steps import resolved_train_steps, resolved_warmup_steps

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# uptraining run -> the softmax run whose checkpoint it loads
UPTRAININGS = {"xl_dense": "paper/xl_dense", "xl_lowrank32": "paper/xl_lowrank32", "tiny": "tiny"}


def test_recipe_7b_is_the_papers():
    recipe = load_yaml_mapping(CONFIGS / "supra" / "recipe_7b.yaml")
    opt = recipe["optimizer"]
    assert recipe["model"]["attention"] == "supra" and recipe["model"]["supra"]["decay"] == "lightning"
    assert (opt["adam_beta1"], opt["adam_beta2"], opt["warmup_steps"]) == (0.9, 0.95, 1000)
    assert opt["lr"] == 3e-5 and opt["lr"] * opt["min_lr_ratio"] == pytest.approx(1e-5)
    assert recipe["training"]["global_batch_size"] * 2048 == 2**21  # 2M-token batches at context 2048
    assert recipe["training"]["train_tokens"] == 20_000_000_000
    one_b = load_yaml_mapping(CONFIGS / "supra" / "recipe_1b.yaml")["optimizer"]
    assert one_b["lr"] == 3e-4 and one_b["lr"] * one_b["min_lr_ratio"] == pytest.approx(1e-5)


@pytest.mark.parametrize("name", list(UPTRAININGS))
def test_uptraining_runs_start_from_their_softmax_run(name):
    run = load_config(TrainConfig, CONFIGS / "supra" / f"{name}.yaml")
    source = load_config(TrainConfig, CONFIGS / f"{UPTRAININGS[name]}.yaml")
    assert run.model.attention == "supra" and source.model.attention == "softmax"
    assert run.checkpoint.load == source.run_dir != run.run_dir
    assert dataclasses.replace(run.model, attention="softmax") == source.model  # only the attention changes
    assert resolved_warmup_steps(run) < resolved_train_steps(run)
    if name.startswith("xl"):
        assert run.tokens_per_step() == 2**21 and run.optimizer.adam_beta2 == 0.95
        assert run.training.train_tokens == pytest.approx(0.05 * source.training.train_tokens, rel=1e-3)


def test_model_check_accepts_checkpoints_written_before_the_attention_keys(tmp_path):
    import yaml

    from megatron_sffn.config.loading import from_dict
    from megatron_sffn.training.checkpointing import CONFIG_FILE, check_same_model
    from tests.workers.train_checks import run_config

    raw = run_config(tmp_path / "run", tmp_path / "data")
    (tmp_path / CONFIG_FILE).write_text(yaml.safe_dump(raw))  # no model.attention / model.supra keys
    softmax = from_dict(TrainConfig, raw)
    assert check_same_model(tmp_path, softmax) is False
    supra = from_dict(TrainConfig, {**raw, "model": {**raw["model"], "attention": "supra"}})
    assert check_same_model(tmp_path, supra, allow_attention_swap=True) is True
    with pytest.raises(ValueError, match=r"model\.attention: checkpoint 'softmax', this run 'supra'"):
        check_same_model(tmp_path, supra)  # resuming is not a swap
