"""Evolving subnetwork training: config checks, draws, FLOP accounting, and the sliced step on a built GPT.

The model checks run in one worker process (``tests/workers/est_checks.py``),
keeping megatron's global state out of the pytest process.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import yaml

from megatron_sffn.accounting.est import est_run_flops, expected_kv_groups, step_forward_flops
from megatron_sffn.accounting.model import forward_flops_per_token
from megatron_sffn.config.est import ESTConfig
from megatron_sffn.config.loading import ConfigError, from_dict
from megatron_sffn.config.model import ModelConfig
from megatron_sffn.config.train import TrainConfig
from megatron_sffn.est import build_plan, draw_subset
from megatron_sffn.flops import main as flops_main
from megatron_sffn.planning.checks import check_run_config
from megatron_sffn.planning.steps import est_plan
from tests.mp_harness import launch

BASE = {
    "run_dir": "runs/x",
    "model": {
        "hidden_size": 64,
        "num_layers": 4,
        "num_attention_heads": 4,
        "vocab_size": 128,
        "seq_length": 16,
        "ffn": {"structure": "lowrank", "rank": 16},
    },
    "data": {"path": "data/prepared"},
    "training": {"micro_batch_size": 2, "global_batch_size": 8, "train_steps": 10},
    "est": {"enabled": True},
}


def _config(**sections) -> TrainConfig:
    data = copy.deepcopy(BASE)
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return from_dict(TrainConfig, data, "run.yaml")


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"est": {"stage1": {"p_H": 1.5}}}, "run.yaml:est.stage1 ESTStage1: p_H=1.5 must be in (0, 1]"),
        ({"est": {"stage2": {"p_M": 0.0}}}, "run.yaml:est.stage2 ESTStage2: p_M=0.0 must be in (0, 1]"),
        ({"est": {"stage_ends": [0.6, 0.3]}}, "stage_ends=[0.6, 0.3]: stages out of order"),
        ({"est": {"stage_ends": [0.3, 1.2]}}, "stages out of order"),
        (
            {"est": {"stage1": {"p_H": 0.25}}, "parallel": {"tensor_parallel": 2}},
            "est.stage1.p_H=0.25 keeps 0.25 x 2 heads of each of the 2 equal parts",
        ),
        ({"est": {"tensor_strata": 3}}, "est.tensor_strata=3 does not divide model.num_attention_heads=4"),
        (
            {"est": {"tensor_strata": 1}, "parallel": {"tensor_parallel": 2}},
            "est.tensor_strata=1 is not a multiple of parallel.tensor_parallel=2",
        ),
        ({"est": {"stage1": {"p_L": 0.3}}}, "est.stage1.p_L=0.3 keeps 0.3 x 4 layers"),
        ({"est": {"unknown": 1}}, "run.yaml:est.unknown: unknown key"),
        ({"sgt": {"enabled": True}}, "est.enabled=true cannot be combined with sgt.enabled=true"),
        (
            {"model": {"ffn": {"structure": "blockshuffle", "blocks": 4}}, "est": {"stage2": {"p_M": 0.3}}},
            "est.stage2.p_M=0.3 keeps 0.3 x 16 hidden units (one fc2 block's rows of one fc1 group) of each of the 16 "
            "equal parts (model.ffn_hidden_size=256 / model.ffn.blocks²=4²=16)",
        ),
        (
            {"model": {"ffn": {"structure": "blockshuffle", "blocks": 2}}, "est": {"tensor_strata": 4}},
            "est.tensor_strata=4 does not divide model.ffn.blocks=2",
        ),
    ],
    ids=[
        "rate-above-1",
        "rate-0",
        "stages-out-of-order",
        "stage-end-above-1",
        "heads-per-tp-rank",
        "strata-heads",
        "strata-vs-tp",
        "layers",
        "unknown-key",
        "with-sgt",
        "blockshuffle-cells",
        "blockshuffle-strata",
    ],
)
def test_bad_configs_fail_naming_the_key(sections, message):
    with pytest.raises(ConfigError) as err:
        check_run_config(_config(**sections))
    assert message in str(err.value)


def test_disabled_by_default_and_off_means_no_plan():
    data = copy.deepcopy(BASE)
    del data["est"]
    config = from_dict(TrainConfig, data, "run.yaml")
    assert config.est.enabled is False and est_plan(config) is None


def test_stages_follow_the_boundaries():
    plan = est_plan(_config(est={"stage_ends": [0.3, 0.6]}))
    assert [plan.rates(s).stage for s in range(1, 11)] == [1, 1, 1, 2, 2, 2, 3, 3, 3, 3]
    assert plan.rates(4).p_L == 1.0 and plan.rates(9).full


def test_draws_are_counter_functions_stratified_and_change_every_step():
    a = draw_subset(7, 3, 1, 2, total=16, strata=4, keep=2)
    b = draw_subset(7, 3, 1, 2, total=16, strata=4, keep=2)
    assert torch.equal(a.kept, b.kept) and a.kept.shape == (4, 2)
    assert all(row.unique().numel() == 2 and int(row.max()) < 4 for row in a.kept)
    rank_parts = [a.indices(rank, 2) for rank in range(2)]
    assert [p.numel() for p in rank_parts] == [4, 4]  # equal work on both TP ranks ...
    assert torch.equal(torch.cat([rank_parts[0], rank_parts[1] + 8]), a.indices())  # ... and the same global draw
    others = {tuple(draw_subset(7, step, 1, 2, total=16, strata=4, keep=2).indices().tolist()) for step in range(20)}
    assert len(others) > 10
    # uniform over the units of a stratum
    counts = torch.zeros(8)
    for step in range(2000):
        counts[draw_subset(1, step, 2, 0, total=8, strata=1, keep=2).indices()] += 1
    assert (counts / 2000 - 0.25).abs().max() < 0.04


def test_plan_keeps_whole_blocks_per_stratum_and_layers_per_stage():
    cfg = _config(model={"ffn": {"structure": "blockdense", "rank": 32, "blocks": 4}}, est={"layer_strata": 2})
    plan = est_plan(cfg)
    assert plan.hidden_strata == (1, 4, 4, 4)  # layer 0 stays dense
    for step in range(1, 4):
        draws = plan.draw(step)
        kept = [d.layer for d in draws if d.active]
        assert sum(layer < 2 for layer in kept) == sum(layer >= 2 for layer in kept) == 1
        for d in draws:
            if d.active:
                assert d.hidden.kept.shape == ((4, 32) if d.layer else (1, 128))


def test_subnetwork_flops_full_draw_and_expectation():
    model = ModelConfig(
        hidden_size=64,
        num_layers=4,
        num_attention_heads=8,
        num_query_groups=2,
        vocab_size=128,
        seq_length=16,
        ffn={"structure": "lowrank", "rank": 16},
    )
    plan = build_plan(model, ESTConfig(enabled=True), total_steps=100, seed=1)
    full = forward_flops_per_token(model)
    assert step_forward_flops(model, plan.draw(90)).total == full.total  # stage 3 draws the full model
    # a skipped layer costs nothing; a kept one its heads, groups and hidden units (hand count below)
    draws = plan.draw(1)
    d, hd = model.hidden_size, model.kv_channels
    manual = 2 * model.vocab_size * d
    for draw in draws:
        if not draw.active:
            continue
        heads, groups, f = draw.heads.count, draw.kv_groups(4), draw.hidden.count
        ffn = (d * 16 + 16 * f) * 2 if draw.layer else 2 * d * f  # LowRank fc1 + fc2; layer 0 dense
        manual += 2 * (2 * heads * hd * d + 2 * groups * hd * d) + 4 * model.seq_length * heads * hd + 2 * ffn
    assert step_forward_flops(model, draws).total == manual
    # the expectation over draws equals the mean of many draws
    mean = sum(step_forward_flops(model, plan.draw(1 + s % 30)).total for s in range(30)) / 30
    run = est_run_flops(model, plan, tokens_per_step=1)
    assert run.stage_steps == (30, 30, 40)
    assert run.stage_flops[0] / 30 / 3 == pytest.approx(mean, rel=0.03)
    assert expected_kv_groups(8, 2, 1, 4) == pytest.approx(2 * (1 - math.comb(4, 4) / math.comb(8, 4)))
    assert 0.0 < run.saving < 1.0 and run.full == 3 * 100 * full.total


def test_flops_cli_est(capsys):
    assert (
        flops_main(["--model", "s", "--structure", "lowrank", "--ratio", "0.32", "--steps", "1000", "--est", "--json"])
        == 0
    )
    import json

    report = json.loads(capsys.readouterr().out)["est"]
    assert report["stage_steps"] == [300, 300, 400] and 0.0 < report["saving"] < 0.5
    assert report["training_flops"] == pytest.approx(sum(report["stage_flops"]))


def test_shipped_est_configs_load():
    from pathlib import Path

    from megatron_sffn.config.loading import load_config

    root = Path(__file__).resolve().parents[1] / "configs" / "est"
    names = sorted(root.glob("*.yaml"))
    assert names
    for path in names:
        config = load_config(TrainConfig, path)
        assert config.est.enabled and est_plan(config) is not None, path
        yaml.safe_load(path.read_text())


STRUCTURES = ["dense", "lowrank", "blockdense", "blockshuffle"]


@pytest.fixture(scope="module")
def checks():
    cases = {
        "dense_gqa": {"structure": "dense"},
        "dense_mha_swiglu": {"structure": "dense", "num_query_groups": 4, "activation": "swiglu"},
        "lowrank": {"structure": "lowrank"},
        "blockdense": {"structure": "blockdense"},
        "blockshuffle": {"structure": "blockshuffle"},
        "blockshuffle_swiglu": {"structure": "blockshuffle", "activation": "swiglu"},
    }
    run = launch(
        "tests.workers.est_checks",
        ["masked_reference", "full_rates_equal_baseline", "adamw_outside_subnetwork"],
        nproc=1,
        timeout=300,
        kwargs={"masked_reference": {"cases": cases}, "full_rates_equal_baseline": {"structures": STRUCTURES}},
    )
    return run.results[0]


@pytest.mark.multiproc
@pytest.mark.parametrize(
    "case", ["dense_gqa", "dense_mha_swiglu", "lowrank", "blockdense", "blockshuffle", "blockshuffle_swiglu"]
)
def test_sampled_step_equals_masked_reference(checks, case):
    result = checks["masked_reference"][case]
    assert result["skipped"]  # the draw skips layers, drops heads and hidden units
    if case != "dense_mha_swiglu":
        assert min(result["kv_groups"]) == 1  # GQA: a key/value group none of whose heads is kept is skipped
    assert abs(result["loss"] - result["ref_loss"]) <= 1e-5 * abs(result["ref_loss"])
    assert result["grad_error"] <= 1e-5
    assert result["zero_grads_agree"] and result["skipped_layer_grads_zero"]


@pytest.mark.multiproc
def test_full_rates_are_the_baseline_model_bit_for_bit(checks):
    assert checks["full_rates_equal_baseline"] == dict.fromkeys(STRUCTURES, True)


@pytest.mark.multiproc
def test_adamw_gives_unsampled_parameters_a_zero_gradient(checks):
    for key, result in checks["adamw_outside_subnetwork"].items():
        assert result["grad_max"] == 0.0, key  # outside the subnetwork: zero gradient ...
        assert result["exp_avg_error"] < 1e-9 and result["exp_avg_sq_error"] < 1e-12, key  # ... moments decay ...
        assert result["update_error"] < 1e-7 and result["moved"] > 1e-4, key  # ... momentum and decay still move it
