"""Self-guided training through ``python -m megatron_sffn.train``, checked against uninterrupted runs.

A tiny LowRank GPT (the trainer tests' model) trains S = 6 steps in same-FLOPs
mode with ratio 0.5: g = 3 appended steps and a guided phase of T = g = 3
steps, on two data-parallel ranks.  Proves, from the per-step trace:

* α follows the cosine schedule (TensorBoard ``sgt/alpha``) and the guides
  switch off after step T; the LR schedule spans all S + g steps;
* the last g steps re-read exactly the data of the first g steps;
* a run stopped (SIGTERM) during guidance, and one stopped after the
  switch-off and the data restart, resume to the uninterrupted run's losses,
  learning rates and batches;
* checkpoints carry the guides (and their optimizer state) only during
  guidance, and the final checkpoint evaluates as a plain structured model;
* tensor parallelism (TP=2) reproduces the single-process run step by step.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_sffn.structured.guided import guide_alpha
from megatron_sffn.training.checkpointing import read_checkpoint_header
from megatron_sffn.training.trace import read_trace
from tests.workers.train_checks import REPO_ROOT, trace_steps, traced_run, train_env, write_dataset

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

BASE_STEPS, EXTRA_STEPS = 6, 3
TOTAL = BASE_STEPS + EXTRA_STEPS
SGT = {"enabled": True, "mode": "same_flops", "ratio": 0.5}
LR = 3e-3  # run_config's peak; min_lr_ratio 0.1


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"))


def _sgt_run(
    tmp: Path, dataset: Path, name: str, *, nproc: int = 2, env_faults: dict | None = None, **sections
) -> tuple[Path, str]:
    sections = {"training": {"train_steps": BASE_STEPS}, "sgt": SGT, **sections}
    return traced_run(tmp, dataset, name, nproc=nproc, env_faults=env_faults, **sections)


_steps = trace_steps


def _guide_keys(checkpoint: Path) -> list[str]:
    from megatron.core import dist_checkpointing

    return sorted(k for k in dist_checkpointing.load_tensors_metadata(str(checkpoint)) if "guide" in k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dataset) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("reference")
    trace, out = _sgt_run(
        tmp,
        dataset,
        "ref",
        logging={"tensorboard": True, "log_interval": 1},
        eval={"interval": 2, "at_end": True},
        checkpoint={"save_interval": 100},
    )
    return trace, out


def test_guided_phase_alpha_switch_off_and_lr_span(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trace, out = reference
    steps = _steps(trace)
    assert sorted(steps) == list(range(1, TOTAL + 1))
    assert f"training steps 1..{TOTAL}" in out and "guides switched off after step 3" in out
    assert all(math.isfinite(steps[s]["loss"]) for s in steps) and steps[TOTAL]["loss"] < steps[1]["loss"]
    assert steps[TOTAL]["lr"] == pytest.approx(0.1 * LR)  # the schedule ends at step S + g ...
    assert steps[BASE_STEPS]["lr"] > 0.2 * LR  # ... not at step S
    events = EventAccumulator(str(trace.parent / "ref" / "tensorboard"))
    events.Reload()
    alpha = {e.step: e.value for e in events.Scalars("sgt/alpha")}
    expected = [guide_alpha(step - 1, EXTRA_STEPS) for step in range(1, TOTAL + 1)]
    assert [alpha[s] for s in range(1, TOTAL + 1)] == pytest.approx(expected, abs=1e-7)
    assert expected[:4] == pytest.approx([1.0, 0.75, 0.25, 0.0])
    rate = {e.step: e.value for e in events.Scalars("sgt/guide_use_rate")}
    assert rate[1] == 1.0 and all(rate[s] == 0.0 for s in range(4, TOTAL + 1))
    assert 0.0 < rate[2] + rate[3] < 2.0  # stochastic: some draws ran the dense branch, some did not


def test_appended_steps_reread_the_guided_phase_data(reference):
    trace, _ = reference
    for rank in (0, 1):
        steps = _steps(trace, rank)
        digests = [steps[s]["tokens_sha256"] for s in range(1, TOTAL + 1)]
        assert len(set(digests[:BASE_STEPS])) == BASE_STEPS
        assert digests[BASE_STEPS:] == digests[:EXTRA_STEPS]


def test_final_checkpoint_has_no_guides_and_evaluates_as_structured_model(reference, tmp_path):
    trace, _ = reference
    run_dir = trace.parent / "ref"
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest.name == f"step_{TOTAL:07d}" and _guide_keys(latest) == []
    measured = [r for r in read_trace(trace / "rank0.jsonl") if "eval_step" in r]
    assert [r["eval_step"] for r in measured] == [2, 4, 6, 8, TOTAL]
    report = tmp_path / "eval.json"
    done = subprocess.run(
        [sys.executable, "-m", "megatron_sffn.evaluate", str(run_dir), "--json", str(report)],
        cwd=REPO_ROOT,
        env=train_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert json.loads(report.read_text())["val_loss"] == pytest.approx(measured[-1]["val_loss"], rel=1e-6)


@pytest.mark.parametrize("stop_after", [2, 7], ids=["during-guidance", "after-switch-off-and-restart"])
def test_stopped_and_resumed_run_equals_uninterrupted(tmp_path, dataset, reference, stop_after):
    trace, out = _sgt_run(
        tmp_path,
        dataset,
        "run",
        env_faults={"SFFN_FAULT_SIGNAL_AT_STEP": str(stop_after)},
        checkpoint={"save_interval": 100},
    )
    assert f"stopped by SIGTERM after step {stop_after}" in out
    checkpoint = tmp_path / "run" / "checkpoints" / f"step_{stop_after:07d}"
    saved = read_checkpoint_header(checkpoint)["sgt"]
    assert (saved["guided_steps"], saved["schedule"], saved["stochastic"]) == (EXTRA_STEPS, "cosine", True)
    assert saved["alpha"] == pytest.approx(guide_alpha(stop_after, EXTRA_STEPS))  # α of the next update
    guides = _guide_keys(checkpoint)
    if stop_after <= EXTRA_STEPS:  # the guides of the 3 structured layers and their AdamW moments
        weights = [k for k in guides if k.startswith("decoder.")]
        assert len(weights) == 6 and all(k.endswith(("linear_fc1.guide", "linear_fc2.guide")) for k in weights)
        moments = {f"chained_1.optimizer.state.{m}.{k}" for m in ("exp_avg", "exp_avg_sq") for k in weights}
        assert set(guides) == set(weights) | moments
    else:
        assert guides == []
    trace, out = _sgt_run(tmp_path, dataset, "run", checkpoint={"save_interval": 100})
    assert f"at step {stop_after}" in out and "training complete" in out
    for rank in (0, 1):
        resumed, uninterrupted = _steps(trace, rank), _steps(reference[0], rank)
        assert sorted(resumed) == list(range(1, TOTAL + 1))
        for step in range(1, TOTAL + 1):
            assert abs(resumed[step]["loss"] - uninterrupted[step]["loss"]) <= 1e-6, (rank, step)
            assert resumed[step]["lr"] == uninterrupted[step]["lr"]
            assert resumed[step]["tokens_sha256"] == uninterrupted[step]["tokens_sha256"], (rank, step)


def test_tensor_parallel_run_equals_single_process_run(tmp_path, dataset):
    """TP=2 and one process both run 4 micro-batches per step, so they draw the same decisions for the same data."""
    single, _ = _sgt_run(tmp_path, dataset, "tp1", nproc=1)
    parallel, out = _sgt_run(tmp_path, dataset, "tp2", parallel={"tensor_parallel": 2})
    assert "TP=2 PP=1 DP=1" in out
    reference = _steps(single)
    for rank in (0, 1):
        steps = _steps(parallel, rank)
        assert sorted(steps) == list(range(1, TOTAL + 1))
        for step in steps:
            assert steps[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5, abs=1e-5), (rank, step)
            assert steps[step]["tokens_sha256"] == reference[step]["tokens_sha256"]
