"""Evolving subnetwork training through ``python -m megatron_sffn.train``, checked against other runs.

A tiny LowRank GPT (the trainer tests' model, 4 layers, 4 heads in 2 query
groups) trains 8 steps: stage 1 (steps 1-3: half the layers, heads and hidden
units), stage 2 (steps 4-6: every layer, half the heads and hidden units),
stage 3 (steps 7-8: full).  The strata are fixed at 2 so that every layout
below draws the same subnetworks.  Proves, from the per-step trace:

* with every rate at 1 the run equals the baseline run exactly;
* the reference (DP=2) logs the stage, the subnetwork's size and its FLOPs
  (TensorBoard), and MFU counts each step's own FLOPs;
* a run stopped by SIGTERM in stage 1 resumes to the uninterrupted run;
* TP=2 and PP=2 reproduce the DP=2 reference step by step;
* with BlockShuffle FFNs (hidden units sampled per fc2 block and fc1 group;
  gated, so that both halves of every rank's fc1 are sliced), TP=2
  reproduces TP=1 step by step.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.workers.train_checks import trace_steps, traced_run, write_dataset

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

STEPS = 8
EST = {
    "enabled": True,
    "stage_ends": [0.4, 0.8],
    "stage1": {"p_L": 0.5, "p_H": 0.5, "p_M": 0.5},
    "stage2": {"p_H": 0.5, "p_M": 0.5},
    "tensor_strata": 2,
    "layer_strata": 2,
}
ONES = {"enabled": True, "stage1": {"p_L": 1.0, "p_H": 1.0, "p_M": 1.0}, "stage2": {"p_H": 1.0, "p_M": 1.0}}
MODEL = {"num_query_groups": 2}
BLOCKSHUFFLE = {**MODEL, "activation": "swiglu", "ffn": {"structure": "blockshuffle", "blocks": 2}}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"))


def _run(tmp: Path, dataset: Path, name: str, **kwargs) -> tuple[Path, str]:
    sections = {"training": {"train_steps": STEPS}, "model": MODEL}
    return traced_run(tmp, dataset, name, **{**sections, **kwargs})


_steps = trace_steps


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dataset) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("reference")
    return _run(tmp, dataset, "ref", est=EST, logging={"tensorboard": True, "log_interval": 1})


def _assert_same_losses(
    trace: Path, reference: Path, ranks=(0, 1), rel: float = 1e-5, same_data_ranks: bool = False
) -> None:
    """Every step's global loss as in ``reference``; with ``same_data_ranks`` also each rank's batches."""
    for rank in ranks:
        steps, expected = _steps(trace, rank), _steps(reference, rank if same_data_ranks else 0)
        assert sorted(steps) == list(range(1, STEPS + 1))
        for step in steps:
            assert steps[step]["loss"] == pytest.approx(expected[step]["loss"], rel=rel, abs=rel), (rank, step)
            if same_data_ranks:
                assert steps[step]["tokens_sha256"] == expected[step]["tokens_sha256"], (rank, step)


def test_rates_of_one_equal_the_baseline_exactly(tmp_path, dataset):
    baseline, _ = _run(tmp_path, dataset, "baseline", nproc=1)
    ones, _ = _run(tmp_path, dataset, "ones", nproc=1, est=ONES)
    expected, steps = _steps(baseline), _steps(ones)
    assert [steps[s]["loss"] for s in steps] == [expected[s]["loss"] for s in expected]
    assert [steps[s]["grad_norm"] for s in steps] == [expected[s]["grad_norm"] for s in expected]


def test_stages_subnetwork_size_and_flops_are_logged(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_sffn.accounting.model import training_flops_per_token
    from megatron_sffn.config.model import ModelConfig

    trace, out = reference
    events = EventAccumulator(str(trace.parent / "ref" / "tensorboard"))
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    assert [scalars["est/stage"][s] for s in range(1, STEPS + 1)] == [1, 1, 1, 2, 2, 2, 3, 3]
    assert all(scalars["est/layers_fraction"][s] == 0.5 for s in (1, 2, 3))
    assert all(scalars["est/layers_fraction"][s] == 1.0 for s in range(4, STEPS + 1))
    assert all(
        scalars["est/heads_fraction"][s] == 0.5 and scalars["est/hidden_fraction"][s] == 0.5 for s in range(1, 7)
    )
    flops = scalars["est/flops_fraction"]
    assert all(flops[s] < flops[s + 3] < 1.0 for s in (1, 2, 3)) and flops[7] == flops[8] == 1.0
    # MFU of a step is its own FLOPs: throughput x FLOPs per token of that step (peak given as 1 TFLOP/s)
    cfg = ModelConfig(
        hidden_size=64,
        num_layers=4,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=128,
        seq_length=16,
        ffn={"structure": "lowrank", "rank": 16},
    )
    for step in (1, 5, 8):
        achieved = scalars["throughput/tokens_per_s_per_device"][step] * training_flops_per_token(cfg) * flops[step]
        assert scalars["throughput/mfu"][step] == pytest.approx(achieved / 1e12, rel=1e-4)
    assert "training complete" in out


def test_stopped_in_stage_one_and_resumed_equals_uninterrupted(tmp_path, dataset, reference):
    trace, out = _run(tmp_path, dataset, "run", est=EST, env_faults={"SFFN_FAULT_SIGNAL_AT_STEP": "2"})
    assert "stopped by SIGTERM after step 2" in out
    trace, out = _run(tmp_path, dataset, "run", est=EST)
    assert "at step 2" in out and "training complete" in out
    _assert_same_losses(trace, reference[0], rel=1e-6, same_data_ranks=True)


def test_tensor_parallel_run_equals_data_parallel_run(tmp_path, dataset, reference):
    trace, out = _run(tmp_path, dataset, "tp2", est=EST, parallel={"tensor_parallel": 2})
    assert "TP=2 PP=1 DP=1" in out
    _assert_same_losses(trace, reference[0])


def test_pipeline_parallel_run_equals_data_parallel_run(tmp_path, dataset, reference):
    trace, out = _run(tmp_path, dataset, "pp2", est=EST, parallel={"pipeline_parallel": 2})
    assert "TP=1 PP=2 DP=1" in out
    _assert_same_losses(trace, reference[0], ranks=(1,))


def test_blockshuffle_tensor_parallel_run_equals_single_rank_run(tmp_path, dataset):
    reference, _ = _run(tmp_path, dataset, "bs_tp1", nproc=1, est=EST, model=BLOCKSHUFFLE)
    trace, out = _run(tmp_path, dataset, "bs_tp2", est=EST, model=BLOCKSHUFFLE, parallel={"tensor_parallel": 2})
    assert "TP=2 PP=1 DP=1" in out
    _assert_same_losses(trace, reference)
