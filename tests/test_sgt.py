"""Self-guided training in one process: schedules, draws, the pure guided layer, FLOP accounting.

References are independent of the code under test: α values worked out by
hand, the guide checked against ``to_dense()`` of the structured layer and
the mixture against a plain dense product, the same-FLOPs ratios against the
ones published in "Building on Efficient Foundations" (Wei et al., 2024).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from megatron_sffn.accounting.presets import preset, training_budget
from megatron_sffn.accounting.sgt import same_flops_ratio, sgt_run_flops, sgt_steps
from megatron_sffn.planning.steps import resolved_train_steps, resolved_warmup_steps, run_sgt_steps
from megatron_sffn.structured import build_linear
from megatron_sffn.structured.guided import (
    GuidedLinear,
    drawn_alpha,
    expected_guide_steps,
    guide_alpha,
    guide_draw,
    mix_guided,
)

# -- schedules --------------------------------------------------------------------


@pytest.mark.parametrize(
    "step, cosine, linear",
    [
        (0, 1.0, 1.0),
        (1, 0.5 * (1 + math.cos(math.pi / 8)), 0.875),
        (2, 0.5 * (1 + math.sqrt(0.5)), 0.75),
        (4, 0.5, 0.5),
        (6, 0.5 * (1 - math.sqrt(0.5)), 0.25),
        (7, 0.5 * (1 - math.cos(math.pi / 8)), 0.125),
        (8, 0.0, 0.0),
        (20, 0.0, 0.0),
    ],
)
def test_alpha_schedules_at_chosen_steps(step, cosine, linear):
    assert guide_alpha(step, 8, "cosine") == pytest.approx(cosine, abs=1e-15)
    assert guide_alpha(step, 8, "linear") == pytest.approx(linear, abs=1e-15)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("guided_steps", [1, 4, 30])
def test_update_one_is_fully_guided_and_update_t_plus_one_is_not(schedule, guided_steps):
    """The trainer's per-update alpha: update 1 runs the guide alone, update T is the last guided one."""
    from megatron_sffn.training.self_guided import GuidancePlan

    plan = GuidancePlan(guided_steps, schedule)
    assert plan.alpha_for_update(1) == 1.0
    assert plan.alpha_for_update(guided_steps) > 0.0
    assert plan.alpha_for_update(guided_steps + 1) == 0.0
    assert not plan.guides_needed_after(guided_steps) and plan.guides_needed_after(guided_steps - 1)


def test_no_guided_phase_means_alpha_zero_and_bad_input_is_named():
    assert guide_alpha(0, 0) == 0.0
    with pytest.raises(ValueError, match="unknown SGT schedule 'exp'"):
        guide_alpha(1, 8, "exp")
    with pytest.raises(ValueError, match="step=-1"):
        guide_alpha(-1, 8)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_expected_guide_steps_is_half_the_guided_phase(schedule):
    for steps in (1, 2, 7, 50, 333):
        assert expected_guide_steps(steps, schedule) == pytest.approx((steps + 1) / 2, rel=1e-12)
        assert expected_guide_steps(steps, schedule, stochastic=False) == steps


# -- draws ---------------------------------------------------------------------------


def test_draws_are_pure_functions_of_their_counters():
    first = [guide_draw(11, step, mb, layer) for step in range(3) for mb in range(4) for layer in range(5)]
    again = [guide_draw(11, step, mb, layer) for step in range(3) for mb in range(4) for layer in range(5)]
    assert first == again
    assert len(set(first)) == len(first)  # every counter changes the number
    assert all(0.0 <= u < 1.0 for u in first)
    assert guide_draw(12, 0, 0, 0) != guide_draw(11, 0, 0, 0)
    with pytest.raises(ValueError, match="micro_batch=-1"):
        guide_draw(1, 1, -1, 1)


@pytest.mark.parametrize("alpha", [0.05, 0.3, 0.5, 0.8, 0.97])
def test_use_rate_of_the_cost_saving_variant_tracks_alpha(alpha):
    draws = 6000  # 200 steps x 6 micro-batches x 5 linears
    used = sum(
        drawn_alpha(alpha, 3, step, mb, layer) == alpha
        for step in range(1, 201)
        for mb in range(6)
        for layer in range(2, 7)
    )
    sigma = math.sqrt(alpha * (1 - alpha) / draws)
    assert abs(used / draws - alpha) < 4 * sigma


def test_drawn_alpha_edges():
    assert drawn_alpha(0.0, 1, 1, 0, 2) == 0.0
    assert all(drawn_alpha(0.2, 1, s, 0, 2, stochastic=False) == 0.2 for s in range(1, 50))
    assert all(drawn_alpha(1.0, 1, s, 0, 2) == 1.0 for s in range(1, 50))  # u < 1 always


# -- the pure guided layer ------------------------------------------------------------

LAYERS = [
    ("lowrank", 24, 40, dict(rank=6)),
    ("lowrank", 40, 24, dict(rank=6)),
    ("blockdense", 24, 40, dict(rank=8, blocks=4)),
    ("blockdense", 40, 24, dict(rank=8, blocks=4)),
    ("blockshuffle", 16, 32, dict(blocks=4)),
    ("blockshuffle", 32, 16, dict(blocks=4)),
    ("blockshuffle", 16, 32, dict(blocks=2)),
]


def _guided(kind, n, m, sizes, skip_bias_add=False) -> GuidedLinear:
    torch.manual_seed(0)
    layer = build_linear(kind, n, m, skip_bias_add=skip_bias_add, **sizes)
    with torch.no_grad():
        layer.bias.normal_()  # a non-zero bias, so that a lost bias shows
    return GuidedLinear(layer)


@pytest.mark.parametrize("kind, n, m, sizes", LAYERS, ids=lambda v: str(v))
def test_guide_starts_as_the_dense_equivalent_and_alpha_one_is_the_guide(kind, n, m, sizes):
    guided = _guided(kind, n, m, sizes)
    dense = guided.structured.to_dense().detach()
    assert torch.equal(guided.guide.detach(), dense)
    x = torch.randn(3, 5, n)
    guided.guide_alpha = 1.0
    reference = x @ dense.T + guided.structured.bias
    torch.testing.assert_close(guided(x), reference, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        guided.guide.add_(0.5)  # the output follows the guide, not the structure
    assert torch.allclose(guided(x), reference + 0.5 * x.sum(-1, keepdim=True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind, n, m, sizes", LAYERS, ids=lambda v: str(v))
def test_alpha_zero_is_the_structured_path_and_mixtures_are_exact(kind, n, m, sizes):
    guided = _guided(kind, n, m, sizes)
    with torch.no_grad():
        guided.guide.normal_()  # far from the structure, so that mixing errors show
    x = torch.randn(7, n)
    guided.guide_alpha = 0.0
    assert torch.equal(guided(x), guided.structured(x))
    guided.guide_alpha = 0.3
    expected = 0.3 * (x @ guided.guide.T) + 0.7 * guided.structured.project(x) + guided.structured.bias
    torch.testing.assert_close(guided(x), expected, rtol=1e-5, atol=1e-6)


def test_gradients_of_the_mixture_reach_guide_and_factors_with_their_weights():
    guided = _guided("lowrank", 12, 20, dict(rank=4))
    x = torch.randn(9, 12)
    guided.guide_alpha = 0.25
    guided(x).square().sum().backward()
    grad_guide = guided.guide.grad.clone()
    grad_u = guided.structured.u.grad.clone()
    # Reference: the same function written out with independent leaves.
    g = guided.guide.detach().clone().requires_grad_(True)
    u = guided.structured.u.detach().clone().requires_grad_(True)
    v = guided.structured.v.detach().clone()
    out = 0.25 * x @ g.T + 0.75 * (x @ v.T) @ u.T + guided.structured.bias.detach()
    out.square().sum().backward()
    torch.testing.assert_close(grad_guide, g.grad)
    torch.testing.assert_close(grad_u, u.grad)


def test_drop_guide_leaves_exactly_the_structured_layer():
    guided = _guided("blockdense", 24, 40, dict(rank=8, blocks=4), skip_bias_add=True)
    x = torch.randn(4, 24)
    guided.guide_alpha = 0.6
    out, bias = guided(x)
    assert bias is guided.structured.bias
    guided.drop_guide()
    assert guided.guide is None and "guide" not in guided.state_dict()
    assert all("guide" not in name for name, _ in guided.named_parameters())
    guided.guide_alpha = 0.6  # nothing to mix any more
    out, _ = guided(x)
    assert torch.equal(out, guided.structured.project(x))


def test_mix_is_exactly_the_guide_at_one():
    guide, structured = torch.randn(5), torch.randn(5)
    assert torch.equal(mix_guided(1.0, guide, structured), guide)


# -- FLOP accounting -----------------------------------------------------------------

PAPER_RATIOS = {  # "Building on Efficient Foundations" (Wei et al., 2024), 32% FFN parameters
    "lowrank": (0.30, 0.38, 0.41, 0.43),
    "blockshuffle": (0.30, 0.38, 0.41, 0.43),
    "blockdense": (0.30, 0.40, 0.41, 0.45),
}
CASES = [
    (kind, size, ratio) for kind, ratios in PAPER_RATIOS.items() for size, ratio in zip("s m l xl".split(), ratios)
]


@pytest.mark.parametrize("kind, size, ratio", CASES)
def test_paper_same_flops_ratios_match_dense_flops_within_half_a_percent(kind, size, ratio):
    cfg, budget = preset(size, structure=kind, ratio=0.32), training_budget(size)
    at_paper_ratio = sgt_run_flops(cfg, sgt_steps(cfg, budget.steps, ratio=ratio), budget.batch_tokens)
    assert abs(at_paper_ratio.total - at_paper_ratio.dense) <= 0.005 * at_paper_ratio.dense
    solved = same_flops_ratio(cfg)
    assert abs(solved - ratio) < 0.005  # the published ratios are rounded to two digits
    at_solved = sgt_run_flops(cfg, sgt_steps(cfg, budget.steps), budget.batch_tokens)
    assert at_solved.vs_dense == pytest.approx(1.0, abs=2e-4)  # whole steps only


def test_guided_phase_and_flops_of_a_same_flops_run_by_hand():
    cfg, budget = preset("s", structure="lowrank", ratio=0.32), training_budget("s")
    steps = sgt_steps(cfg, 4196, ratio=0.30)
    # 0.30 x 4196 = 1258.8 steps: floored, as the paper's code does (int(max_step * ratio))
    assert (steps.base_steps, steps.extra_steps, steps.guided_steps, steps.total_steps) == (4196, 1258, 1258, 5454)
    flops = sgt_run_flops(cfg, steps, budget.batch_tokens)
    # Worked out from the paper's formula: structured 185,401,344 and dense 256,770,048 forward FLOPs per
    # token, guides on the 11 structured layers 11 x 2 x 2 x 768 x 3072 = 103,809,024.
    tokens = 524_288
    assert flops.model == 3 * 185_401_344 * tokens * 5454
    assert flops.guides == pytest.approx(3 * 103_809_024 * tokens * 629.5)  # (T + 1) / 2
    assert flops.dense == 3 * 256_770_048 * tokens * 4196


def test_fixed_steps_and_explicit_fractions():
    cfg = preset("m", structure="blockshuffle", ratio=0.32)
    assert sgt_steps(cfg, 1000, mode="fixed_steps") == sgt_steps(cfg, 1000, mode="fixed_steps", guided_fraction=0.5)
    fixed = sgt_steps(cfg, 1000, mode="fixed_steps", guided_fraction=0.3)
    assert (fixed.total_steps, fixed.guided_steps) == (1000, 300)
    half = sgt_steps(cfg, 1000, guided_fraction=0.5)
    assert half.guided_steps == int(0.5 * half.total_steps)
    assert sgt_run_flops(cfg, half, 1024).vs_dense == pytest.approx(1.0, abs=1e-3)
    # Guiding half of a longer run costs more per extra step: fewer extra steps fit.
    assert half.extra_steps < sgt_steps(cfg, 1000).extra_steps


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: same_flops_ratio(preset("s")), "needs structured FFNs"),
        (
            lambda: sgt_steps(preset("s", structure="lowrank", ratio=0.32), 100, mode="fixed_steps", ratio=0.3),
            "sgt.ratio=0.3 applies to sgt.mode='same_flops' only",
        ),
        (lambda: sgt_steps(preset("s", structure="lowrank", ratio=0.32), 100, mode="steps"), "sgt.mode='steps'"),
        (
            lambda: sgt_steps(preset("s", structure="lowrank", ratio=0.32), 100, guided_fraction=1.5),
            r"sgt.guided_fraction=1.5 must be in \(0, 1\]",
        ),
        (
            lambda: same_flops_ratio(
                preset("s", structure="lowrank", ratio=0.63), guided_fraction=1.0, stochastic=False
            ),
            "no same-FLOPs run exists",
        ),
    ],
)
def test_accounting_errors_name_the_setting(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_dense_reference_of_flops_is_the_dense_model():
    cfg = preset("s", structure="lowrank", ratio=0.32)
    flops = sgt_run_flops(cfg, sgt_steps(cfg, 10, ratio=0.5), 1024)
    assert flops.dense == 3 * 1024 * 10 * 256_770_048


# -- configuration and resume checks ----------------------------------------------------


def test_sgt_section_validates_its_keys():
    from megatron_sffn.config.loading import ConfigError, from_dict
    from megatron_sffn.config.sgt import SGTConfig

    assert from_dict(SGTConfig, {"enabled": True}) == SGTConfig(enabled=True, mode="fixed_steps")
    with pytest.raises(ConfigError, match="run.yaml: SGTConfig: ratio=0.3 applies to mode='same_flops' only"):
        from_dict(SGTConfig, {"ratio": 0.3}, "run.yaml")
    with pytest.raises(ConfigError, match=r"guided_fraction=0.0 must be in \(0, 1\]"):
        from_dict(SGTConfig, {"guided_fraction": 0})
    with pytest.raises(ConfigError, match="mode: 'flops' is not one of"):
        from_dict(SGTConfig, {"mode": "flops"})


def test_plan_must_match_on_resume():
    from megatron_sffn.training.self_guided import GuidancePlan, refuse_guided_checkpoint

    plan = GuidancePlan(30, "cosine", True, 7)
    plan.check_resume(GuidancePlan(30, "cosine", True, 7).state_dict(), "ckpt")
    with pytest.raises(ValueError, match="guided_steps: checkpoint 40, this run 30"):
        plan.check_resume(GuidancePlan(40, "cosine", True, 7).state_dict(), "ckpt")
    with pytest.raises(ValueError, match="ckpt was saved without self-guided training"):
        plan.check_resume(None, "ckpt")
    with pytest.raises(ValueError, match="saved during self-guided training .step 12 of a 30-step guided phase"):
        refuse_guided_checkpoint(plan.state_dict(), 12, "ckpt")
    refuse_guided_checkpoint(plan.state_dict(), 30, "ckpt")  # guides were gone
    refuse_guided_checkpoint(None, 3, "ckpt")


# -- shipped run configurations ------------------------------------------------------------

SGT_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "sgt").glob("*.yaml"))


def test_every_paper_size_and_32_percent_structure_has_both_modes():
    names = {p.stem for p in SGT_CONFIGS}
    expected = {
        f"{size}_{kind}32_{mode}"
        for size in ("s", "m", "l", "xl")
        for kind in PAPER_RATIOS
        for mode in ("same_flops", "fixed_steps")
    }
    assert names == expected


@pytest.mark.parametrize("path", SGT_CONFIGS, ids=lambda p: p.stem)
def test_shipped_sgt_runs(path):
    from megatron_sffn.config.loading import load_config, load_yaml_mapping
    from megatron_sffn.config.train import TrainConfig

    config = load_config(TrainConfig, path)
    size, kind, mode = re.fullmatch(r"(s|m|l|xl)_(\w+)32_(same_flops|fixed_steps)", path.stem).groups()
    paper = load_config(TrainConfig, path.parent.parent / "paper" / f"{size}_{kind}32.yaml")
    assert config.model == paper.model  # SGT changes the run, never the model (checkpoints stay compatible)
    assert config.sgt.enabled and config.sgt.mode == mode and config.sgt.schedule == "cosine" and config.sgt.stochastic
    steps = run_sgt_steps(config)
    base = training_budget(size).steps
    assert steps.base_steps == base == config.resolved_base_steps()
    assert resolved_train_steps(config) == steps.total_steps
    if mode == "fixed_steps":
        assert (steps.extra_steps, steps.guided_steps) == (0, int(0.5 * base))
        return
    ratio = PAPER_RATIOS[kind]["s m l xl".split().index(size)]
    assert load_yaml_mapping(path)["sgt"]["ratio"] == ratio
    assert steps.extra_steps == steps.guided_steps == int(ratio * base)  # the paper's code floors
    flops = sgt_run_flops(config.model, steps, config.tokens_per_step())
    assert abs(flops.vs_dense - 1.0) <= 0.005


def _run(**sections):
    from megatron_sffn.config.loading import from_dict
    from megatron_sffn.config.train import TrainConfig

    config = {
        "run_dir": "r",
        "data": {"path": "d"},
        "model": {
            "hidden_size": 64,
            "num_layers": 3,
            "num_attention_heads": 4,
            "vocab_size": 128,
            "seq_length": 16,
            "ffn": {"structure": "lowrank", "rank": 16},
        },
        "training": {"micro_batch_size": 2, "global_batch_size": 8, "train_steps": 100},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return from_dict(TrainConfig, config, "run.yaml")


def test_run_length_and_refusals_of_the_sgt_section():
    from megatron_sffn.config.loading import ConfigError

    assert resolved_train_steps(_run()) == 100 and run_sgt_steps(_run()) is None
    same = _run(sgt={"enabled": True, "mode": "same_flops", "ratio": 0.25})
    assert (same.resolved_base_steps(), resolved_train_steps(same), run_sgt_steps(same).guided_steps) == (100, 125, 25)
    assert resolved_warmup_steps(same) == 12  # 10% of all S + g steps
    assert run_sgt_steps(_run(sgt={"enabled": True})).guided_steps == 50
    with pytest.raises(ConfigError, match="sgt.enabled=true needs structured FFNs"):
        _run(sgt={"enabled": True}, model={"ffn": {"structure": "dense"}})
    with pytest.raises(ConfigError, match="sgt.stochastic=true cannot be combined with training.recompute_granularity"):
        _run(
            sgt={"enabled": True},
            training={"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
        )
    assert _run(
        sgt={"enabled": True, "stochastic": False},
        training={"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    ).sgt.enabled
