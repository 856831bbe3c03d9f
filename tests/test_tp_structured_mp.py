"""Tensor-parallel structured FFNs across real processes (2 gloo ranks, one torchrun launch).

Proves, for dense and every structure and strategy (gated variants too):
TP=2 equals TP=1 from the same seed through megatron's ``MLP`` built from the
spec factory (output, loss, input gradient, every weight and gathered
gradient); one rank's FLOPs (counted by ``FlopCounterMode``), traffic
(recorded collectives) and parameters equal the closed-form plan that the
documentation tabulates; sharded checkpoints reshard TP=2 <-> TP=1; and the
BlockShuffle MLP at TP=2 is the paper's FFN written from explicit matrices
(``tests/workers/blockshuffle_ffn.py``), also running a hidden-unit subset of
evolving subnetwork training against that FFN with a 1/p hidden mask.
"""

from __future__ import annotations

import pytest

from tests.mp_harness import launch
from tests.workers.blockshuffle_ffn import TOLERANCE as SPEC_TOLERANCE
from tests.workers.blockshuffle_ffn import spec_cases, subset_case_name, subset_cases
from tests.workers.tp_structured import CASES, RESHARD_CASES

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def run():
    checks = [
        "tp2_matches_tp1",
        "checkpoint_reshard",
        "blockshuffle_ffn_matches_spec",
        "blockshuffle_subset_matches_spec",
        "block_major_checkpoint_refused",
    ]
    return launch("tests.workers.tp_structured", checks, nproc=2, timeout=420)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_tp2_matches_tp1(run, case):
    for rank, results in enumerate(run.results):
        result = results["tp2_matches_tp1"][case.name]
        assert any(k.startswith("grad:") for k in result.errors)
        bad = {k: v for k, v in result.errors.items() if not v <= TOLERANCE}
        assert not bad, f"rank {rank} ({result.strategy}): relative errors above {TOLERANCE}: {bad}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_measured_cost_equals_plan(run, case):
    for rank, results in enumerate(run.results):
        result = results["tp2_matches_tp1"][case.name]
        assert result.measured == result.expected, f"rank {rank} ({result.strategy})"


def test_auto_strategy_of_each_case_is_reported(run):
    strategies = {name: r.strategy for name, r in run.results[0]["tp2_matches_tp1"].items()}
    assert strategies["lowrank-R8-auto"] == "split/token"
    assert strategies["blockshuffle-B4-auto"] == "replicated/reduce"


@pytest.mark.parametrize("pair", RESHARD_CASES, ids=lambda p: f"{p[0].name}->{p[1].strategy}")
def test_checkpoint_reshards_between_tp2_and_tp1(run, pair):
    saved, loaded = pair
    for rank, results in enumerate(run.results):
        errors = results["checkpoint_reshard"][f"{saved.name} -> {loaded.strategy}"]
        for direction in ("tp2->tp1", "tp1->tp2"):
            assert errors[f"{direction}:after"] <= TOLERANCE, (rank, direction, errors)
            assert errors[f"{direction}:before"] > 1e-2, (rank, direction, "loading MLP already matched")


@pytest.mark.parametrize("case", spec_cases(("replicated/reduce", "split/reduce")), ids=lambda c: c.name)
def test_tp2_blockshuffle_mlp_is_the_papers_ffn(run, case):
    for rank, results in enumerate(run.results):
        errors = results["blockshuffle_ffn_matches_spec"][case.name]
        assert len([k for k in errors if k.startswith("grad:")]) == 6
        bad = {k: v for k, v in errors.items() if not v <= SPEC_TOLERANCE}
        assert not bad, f"rank {rank}: relative errors above {SPEC_TOLERANCE}: {bad}"


SUBSET_CASES = subset_cases(("replicated/reduce", "split/reduce"))


@pytest.mark.parametrize("case, rate", SUBSET_CASES, ids=[subset_case_name(*c) for c in SUBSET_CASES])
def test_tp2_blockshuffle_hidden_subset_is_the_masked_papers_ffn(run, case, rate):
    """Evolving subnetwork training's sampled BlockShuffle MLP at TP=2: each rank its own cells, same function."""
    for rank, results in enumerate(run.results):
        errors = results["blockshuffle_subset_matches_spec"][subset_case_name(case, rate)]
        assert len([k for k in errors if k.startswith("grad:")]) == 6
        bad = {k: v for k, v in errors.items() if not v <= SPEC_TOLERANCE}
        assert not bad, f"rank {rank}: relative errors above {SPEC_TOLERANCE}: {bad}"


def test_block_major_blockshuffle_checkpoint_is_refused_saying_why(run):
    """A checkpoint of the former block-major hidden order (another FFN) fails before any tensor loads."""
    for results in run.results:
        messages = results["block_major_checkpoint_refused"]
        for how in ("load_checkpoint", "load_state_dict"):
            assert "block-major" in messages[how] and "different FFN" in messages[how], (how, messages[how])
