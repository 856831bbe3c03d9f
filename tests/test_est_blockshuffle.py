"""Evolving subnetwork training on BlockShuffle FFNs: hidden units kept per (fc2 block, fc1 group) cell.

* a sampled BlockShuffle MLP (a smaller Monarch FFN, no masking) equals the
  paper's FFN written from explicit matrices with the dropped hidden units
  zeroed and the kept ones scaled by 1/p (:mod:`tests.workers.blockshuffle_ffn`):
  output, loss, input and every weight gradient, fp32; the same at TP=2 for
  both fc1 strategies runs in the launch of ``test_tp_structured_mp.py``;
* the plan's draw keeps the same number of units in every cell and on every
  TP shard, and is a function of (seed, step, layer);
* the FLOPs the accounting charges for a step equal those of the products the
  sampled MLP really runs (counted by ``FlopCounterMode``), also when the
  subset is narrower than the model.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_sffn.accounting.model import layer_forward_flops
from megatron_sffn.config.est import ESTConfig, ESTStage1
from megatron_sffn.config.model import ModelConfig
from megatron_sffn.est import build_plan
from megatron_sffn.flops import main as flops_main
from megatron_sffn.parallel.comm import ShapeOnlyGroup
from tests.workers.blockshuffle_ffn import (
    TOLERANCE,
    SpecCase,
    build_spec_mlp,
    compare_with_spec,
    hidden_draw,
    subset_case_name,
    subset_cases,
)


@pytest.mark.parametrize("case, rate", subset_cases(), ids=[subset_case_name(*c) for c in subset_cases()])
def test_sampled_mlp_is_the_masked_papers_ffn(case, rate):
    draw = hidden_draw(case, rate)
    assert draw.subset.count == rate * case.ffn_hidden
    errors = compare_with_spec(build_spec_mlp(case, ShapeOnlyGroup(0, 1), subnetwork=True), case, hidden=draw)
    assert len([k for k in errors if k.startswith("grad:")]) == 6
    bad = {k: v for k, v in errors.items() if not v <= TOLERANCE}
    assert not bad, f"relative errors above {TOLERANCE}: {bad}"


def _model(blocks: int = 4, **overrides) -> ModelConfig:
    return ModelConfig(
        **{
            "hidden_size": 64,
            "num_layers": 3,
            "num_attention_heads": 4,
            "vocab_size": 128,
            "seq_length": 16,
            "ffn": {"structure": "blockshuffle", "blocks": blocks},
            **overrides,
        }
    )


def _cell_of(unit: int, blocks: int, ffn_hidden: int) -> tuple[int, int]:
    """(fc2 block, fc1 group) of interleaved hidden unit ``unit`` (structured-ffn spec)."""
    row, group = divmod(unit, blocks)
    return row // (ffn_hidden // blocks // blocks), group


@pytest.mark.parametrize("blocks", [2, 4])
def test_draw_keeps_equal_counts_per_cell_and_shard_and_repeats(blocks):
    model = _model(blocks)
    f, rate = model.ffn_hidden_size, 0.25
    est = ESTConfig(enabled=True, stage1=ESTStage1(p_L=1.0, p_H=0.5, p_M=rate))
    plan = build_plan(model, est, total_steps=10, seed=3, tensor_parallel=2)
    again = build_plan(model, est, total_steps=10, seed=3, tensor_parallel=2)
    assert plan.hidden_strata == (2, blocks * blocks, blocks * blocks)  # layer 0 stays dense: by TP shard
    seen = set()
    for step in (1, 2):
        for draw, repeat in zip(plan.draw(step)[1:], again.draw(step)[1:]):
            assert torch.equal(draw.hidden.kept, repeat.hidden.kept)
            units = draw.hidden.indices().tolist()
            assert len(set(units)) == len(units) == rate * f
            cells = [_cell_of(u, blocks, f) for u in units]
            assert all(cells.count((k, c)) == rate * f / blocks**2 for k in range(blocks) for c in range(blocks))
            for rank in range(2):  # a rank holds f/2 contiguous units: its own ones, as local indices
                local = draw.hidden.indices(rank, 2)
                assert local.numel() == rate * f / 2 and 0 <= int(local.min()) and int(local.max()) < f // 2
                assert sorted((local + rank * f // 2).tolist()) == sorted(u for u in units if u // (f // 2) == rank)
            seen.add(tuple(units))
    assert len(seen) == 4  # a new subnetwork each step and layer


@pytest.mark.parametrize("rate", [0.5, 0.125])  # 0.125: the subset (32 units) is narrower than d = 64
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_accounted_flops_are_the_products_run(rate, activation):
    model = _model(2, activation=activation)
    case = SpecCase(model.hidden_size, model.ffn_hidden_size, 2)
    draw = hidden_draw(case, rate)
    mlp = build_spec_mlp(case, ShapeOnlyGroup(0, 1), subnetwork=True) if activation == "gelu" else _gated_mlp(model)
    mlp.select_hidden(draw.subset, rate)
    tokens = 6
    with FlopCounterMode(display=False) as counter:
        mlp(torch.randn(tokens, model.hidden_size))
    assert counter.get_total_flops() == tokens * layer_forward_flops(model, 1, hidden=draw.subset.count).ffn
    assert layer_forward_flops(model, 1, hidden=model.ffn_hidden_size) == layer_forward_flops(model, 1)


def _gated_mlp(model: ModelConfig):
    from megatron_sffn.parallel.subnetwork import SubnetworkMLP
    from tests.workers.tp_structured import Case, build_mlp

    case = Case(
        "blockshuffle", blocks=model.ffn.blocks, gated=True, hidden=model.hidden_size, ffn_hidden=model.ffn_hidden_size
    )
    return build_mlp(case, ShapeOnlyGroup(0, 1), mlp_class=SubnetworkMLP)


def test_flops_cli_est_blockshuffle(capsys):
    assert (
        flops_main(
            ["--model", "s", "--structure", "blockshuffle", "--ratio", "0.32", "--steps", "1000", "--est", "--json"]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)["est"]
    assert report["stage_steps"] == [300, 300, 400] and 0.0 < report["saving"] < 0.5


def test_plans_saved_before_blockshuffle_subsets_still_resume():
    from megatron_sffn.training.est import EvolvingSubnetworks

    lowrank = _model(num_layers=4, ffn={"structure": "lowrank", "rank": 16})
    plan = build_plan(lowrank, ESTConfig(enabled=True), total_steps=10, seed=3)
    older = {k: v for k, v in plan.state_dict().items() if k != "hidden_groups"}
    est = EvolvingSubnetworks(plan, lowrank, [])
    est.prepare_resume(older, 2, "ckpt")  # the same plan: resumes
    other = build_plan(_model(num_layers=4), ESTConfig(enabled=True), total_steps=10, seed=3).state_dict()
    with pytest.raises(ValueError, match="hidden_groups: checkpoint"):
        EvolvingSubnetworks(plan, lowrank, []).prepare_resume(other, 2, "ckpt")
