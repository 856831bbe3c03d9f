"""Tensor and pipeline parallelism of the full GPT reproduce the single-process model.

Two torchrun launches: the references (TP=1, PP=1, one process) and every
parallel layout on four processes (whatever TP x PP leaves is data parallel),
where the same launch also checks checkpoint resharding and build errors.
Training goes through megatron's schedules, DDP, optimizer and
``finalize_model_grads``; gradients and weights are reassembled from the
modules' own sharded-checkpoint descriptions.
"""

from __future__ import annotations

import re

import pytest
import torch

from tests.mp_harness import launch

pytestmark = pytest.mark.multiproc

STRUCTURES = ["dense", "lowrank", "blockdense", "blockshuffle"]
LAYOUTS = [
    ("dense", 1, 2),  # PP=2, DP=2: tied embedding split between first and last stage
    ("dense", 2, 2),  # TP=2 x PP=2
    ("lowrank", 2, 2),
    ("blockshuffle", 2, 2),  # the paper's hidden-unit order split over TP, layers over PP
    *[(s, 2, 1) for s in STRUCTURES],  # TP=2, DP=2
]
CONTROL = ("dense", 1, 2)  # trained without finalize_model_grads: must NOT match
LOSS_TOL = 1e-5
GRAD_TOL = 1e-5
# Weights after a few Adam steps: where a gradient is ~eps, rounding-level
# gradient differences move single elements by up to ~lr (Adam divides by
# sqrt(v)).  So weights are compared by the share of elements that differ and
# by the relative norm of the difference; a missing gradient term changes
# nearly every element of the affected tensors.
WEIGHT_ELEMENT_TOL = 1e-5
MAX_DIFFERING_SHARE = 1e-3
MAX_RELATIVE_NORM = 1e-3


def _run(structure: str, tp: int, pp: int) -> str:
    return f"{structure}/tp{tp}pp{pp}"


@pytest.fixture(scope="module")
def reference():
    run = launch(
        "tests.workers.model_parallel",
        ["reference_training"],
        nproc=1,
        timeout=300,
        kwargs={"reference_training": {"structures": STRUCTURES}},
    )
    return run.results[0]["reference_training"]


@pytest.fixture(scope="module")
def parallel():
    run = launch(
        "tests.workers.model_parallel",
        ["layout_training", "control_without_finalize", "checkpoint_reshard", "build_error"],
        nproc=4,
        timeout=600,
        kwargs={
            "layout_training": {"layouts": LAYOUTS},
            "control_without_finalize": {"layout": CONTROL},
            "checkpoint_reshard": {"structures": STRUCTURES},
            "build_error": {"structure": "blockshuffle", "tp": 2, "blocks": 1},
        },
    )
    return run.results


def _last_stage_losses(results, key: str, check: str = "layout_training") -> list[list[float]]:
    found = [r[check][key]["losses"] for r in results if r[check][key]["losses"][0] is not None]
    assert found, f"no rank reported losses for {key}"
    return found


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b), set(a) ^ set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _weight_differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """Per tensor: (share of elements differing by more than the tolerance, relative norm of the difference)."""
    assert set(a) == set(b), set(a) ^ set(b)
    out = {}
    for key in a:
        diff = a[key] - b[key]
        share = (diff.abs() > WEIGHT_ELEMENT_TOL).float().mean().item()
        out[key] = (share, (diff.norm() / b[key].norm()).item())
    return out


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: _run(*layout))
def test_layout_losses_and_grad_norms_match_single_process(reference, parallel, layout):
    structure = layout[0]
    ref = reference[structure]
    for losses in _last_stage_losses(parallel, _run(*layout)):
        assert losses == pytest.approx(ref["losses"], abs=LOSS_TOL)
    for rank in parallel:
        assert rank["layout_training"][_run(*layout)]["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: _run(*layout))
def test_layout_gradients_and_weights_match_single_process(reference, parallel, layout):
    run = parallel[0]["layout_training"][_run(*layout)]
    ref = reference[layout[0]]
    assert _max_diff(run["grads"], ref["grads"]) < GRAD_TOL
    differing = {
        key: (share, rel)
        for key, (share, rel) in _weight_differences(run["params"], ref["params"]).items()
        if share > MAX_DIFFERING_SHARE or rel > MAX_RELATIVE_NORM
    }
    assert not differing, differing
    # copies of one tensor on several ranks (DP replicas, TP-replicated tensors,
    # the tied embedding on the first and last stage) agree after finalize_model_grads
    assert run["grad_replica_mismatch"] < 1e-6
    assert run["param_replica_mismatch"] < 1e-6


def test_control_without_embedding_reduction_diverges(reference, parallel):
    """Sensitivity of the comparison above: skipping finalize_model_grads must be caught."""
    run = parallel[0]["control_without_finalize"]
    assert run["grad_replica_mismatch"] > 1e-3  # tied copies on the two stages disagree
    differences = _weight_differences(run["params"], reference[CONTROL[0]]["params"])
    assert differences["embedding.word_embeddings.weight"][0] > 0.5


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("direction", ["tp2pp2->tp1", "tp1->tp2"])
def test_checkpoint_loads_at_another_layout_with_identical_logits(parallel, structure, direction):
    runs = [r["checkpoint_reshard"][f"{structure}/{direction}"] for r in parallel]
    saved = [r["saved"] for r in runs if r["saved"] is not None]
    loaded = [r["loaded"] for r in runs if r["loaded"] is not None]
    assert saved and loaded
    assert saved[0].shape == loaded[0].shape == (2, 16, 128)
    for logits in saved + loaded:
        torch.testing.assert_close(logits, saved[0], rtol=0, atol=1e-5)


def test_blocks_not_divisible_by_tp_fail_naming_both_numbers(parallel):
    for rank in parallel:
        message = rank["build_error"]
        assert re.search(r"\bblocks=1\b", message) and re.search(r"=2\b", message), message
