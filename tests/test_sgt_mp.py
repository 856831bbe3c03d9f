"""Self-guided training across two gloo ranks (one torchrun launch); the checks live in ``tests/workers/sgt_checks.py``.

Proves: a tensor-parallel guide is the dense layer of the same shape sharded
like megatron's column/row pair (TP=2 equals TP=1 with guides, for every
structure and strategy, gradients of the guides included); α = 1 gives the
dense MLP of the guides and α = 0 the structured MLP; the trainer's guide
controller trains TP=2 x DP=1 exactly like TP=1 x DP=2 through the guided
phase and after the switch-off, with every tensor-parallel rank of a layer
taking the same counter-based draws; after the switch-off no guide parameter,
gradient buffer or optimizer moment is left.
"""

from __future__ import annotations

import pytest

from tests.mp_harness import launch
from tests.workers.sgt_checks import GUIDED_CASES, GUIDED_STEPS, STEPS

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def run():
    return launch(
        "tests.workers.sgt_checks",
        ["guided_mlp_tp2_matches_tp1", "guided_training_tp2_matches_tp1", "guided_training_pp2_matches_dp2"],
        nproc=2,
        timeout=600,
        kwargs={
            "guided_training_tp2_matches_tp1": {"structure": {"structure": "lowrank", "rank": 16}},
            # Layers 0 and 1 dense: the first of two pipeline stages holds no guide at all.
            "guided_training_pp2_matches_dp2": {
                "structure": {"structure": "blockshuffle", "blocks": 4, "dense_layers": [0, 1]}
            },
        },
    )


@pytest.mark.parametrize("case", GUIDED_CASES, ids=lambda c: c.name)
def test_guided_mlp_at_tp2_equals_tp1_and_its_limits(run, case):
    for rank, results in enumerate(run.results):
        errors = results["guided_mlp_tp2_matches_tp1"][case.name]
        assert any(k.endswith("grad:linear_fc1.guide") for k in errors) and "init:linear_fc2.guide" in errors
        assert errors.pop("alpha0:structured") == 0.0, f"rank {rank}: alpha=0 is not the structured MLP"
        bad = {k: v for k, v in errors.items() if not v <= TOLERANCE}
        assert not bad, f"rank {rank}: relative errors above {TOLERANCE}: {bad}"


@pytest.fixture(scope="module")
def training(run):
    return [results["guided_training_tp2_matches_tp1"] for results in run.results]


def test_guided_training_at_tp2_reproduces_tp1(training):
    reference = training[0]["tp1"]["losses"]
    assert len(reference) == STEPS and reference[-1] < reference[0]
    for rank in (0, 1):
        assert training[rank]["tp1"]["losses"] == reference  # every rank knows the global loss
        assert training[rank]["tp2"]["losses"] == pytest.approx(reference, rel=TOLERANCE, abs=TOLERANCE)


def test_draws_are_identical_on_tensor_parallel_ranks_and_are_the_counter_draws(training):
    for tp in ("tp1", "tp2"):
        for rank in (0, 1):
            result = training[rank][tp]
            used = [[alpha for _, alpha in step] for step in result["used"]]
            assert used == result["expected_used"], (tp, rank)
    tp2 = training[0]["tp2"]["used_by_rank"]
    assert tp2[0] == tp2[1]  # both TP ranks of every layer made the same choices
    tp1 = training[0]["tp1"]["used_by_rank"]
    assert tp1[0] != tp1[1]  # data-parallel ranks see other micro-batches, hence other draws
    guided = [alpha for step in tp2[0][1:GUIDED_STEPS] for _, alpha in step]
    assert 0.0 in guided and any(0.0 < a < 1.0 for a in guided)  # draws both hit and missed
    assert all(alpha == 1.0 for _, alpha in tp2[0][0])  # alpha(0) = 1: every layer mixes
    assert all(alpha == 0.0 for step in tp2[0][GUIDED_STEPS:] for _, alpha in step)


def test_switch_off_leaves_no_guide_behind(training):
    for rank in (0, 1):
        for tp in ("tp1", "tp2"):
            result = training[rank][tp]
            assert result["slots"] == 6  # 3 structured layers x (fc1, fc2)
            assert result["guide_params_left"] == [] and result["guide_state_keys"] == []
            assert result["guides_alive"] == 0  # the parameters themselves were freed
            assert result["optimizer_params"] == result["model_params"] == result["grad_buffer_elements"]
            assert result["optimizer_state_params_outside_model"] == 0
            assert result["finalize_is_plain"]
            assert result["scheduler_drives_the_model_optimizer"]


def test_guided_training_at_pp2_reproduces_dp2_with_a_stage_without_guides(run):
    results = [r["guided_training_pp2_matches_dp2"] for r in run.results]
    reference = results[0]["dp2"]["losses"]
    assert reference[-1] < reference[0]
    assert [r["pp2"]["slots"] for r in results] == [0, 4]  # stage 0: layers 0-1 dense; stage 1: layers 2-3
    for rank in (0, 1):
        assert results[rank]["pp2"]["losses"] == pytest.approx(reference, rel=TOLERANCE, abs=TOLERANCE)
        assert results[rank]["pp2"]["guide_params_left"] == [] and results[rank]["pp2"]["guides_alive"] == 0
