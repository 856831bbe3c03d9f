"""End-to-end launches of ``python -m megatron_sffn.train`` (and ``evaluate``), compared with references.

Every claim is checked against an independent run rather than a stored number:

* pre-empted (SIGTERM) and resumed == uninterrupted, loss by loss and batch by batch;
* TP=2 and PP=2 == TP=1 (data-parallel) for several optimizer steps;
* a checkpoint saved at TP=2 evaluates at TP=1 to the perplexity the TP=2 run measured;
* SIGKILL in the middle of a save leaves ``latest`` on a loadable checkpoint that
  continues the killed run's own trajectory;
* NaN steps are skipped without touching the weights, and a streak stops the run;
* activation recomputation does not change the losses;
* a raw-text run at DP=2 pre-empted and resumed at DP=2 and at DP=1 (its glob now matching
  one more file) reads exactly the uninterrupted stream, and its saved skip counters are the
  sum over ranks.

Runs are tiny (4 layers, hidden 64, sequence 16) and use the step trace
(``SFFN_STEP_TRACE``) for exact per-step losses and token digests.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_sffn.data.on_the_fly import build_text_train_loader, text_settings
from megatron_sffn.data.streaming import StreamLayout
from megatron_sffn.training.checkpointing import read_checkpoint_header
from megatron_sffn.training.trace import read_trace, sample_digests
from tests.workers.train_checks import (
    REPO_ROOT,
    SEQ,
    run_config,
    run_train,
    train_command,
    train_env,
    write_config,
    write_dataset,
    write_text_corpus,
)

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]
STEPS = 8


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"))


def _trained(
    tmp: Path,
    dataset: Path,
    name: str,
    *,
    nproc: int = 1,
    env_faults: dict | None = None,
    expect_rc: int = 0,
    overrides: tuple[str, ...] = (),
    **sections,
) -> tuple[Path, str]:
    """Run (or resume) the run ``name`` under ``tmp``; returns (trace dir, output)."""
    run_dir, trace = tmp / name, tmp / f"{name}.trace"
    config = write_config(tmp / f"{name}.yaml", run_config(run_dir, dataset, **sections))
    done = run_train(config, nproc=nproc, overrides=list(overrides), env=train_env(trace, **(env_faults or {})))
    assert done.returncode == expect_rc, f"exit code {done.returncode}:\n{done.stdout[-6000:]}"
    return trace, done.stdout


def _steps(trace: Path, rank: int = 0) -> dict[int, dict]:
    return {r["step"]: r for r in read_trace(trace / f"rank{rank}.jsonl") if "step" in r}


def _losses(trace: Path, rank: int) -> list[float]:
    steps = _steps(trace, rank)
    return [steps[s]["loss"] for s in sorted(steps)]


@pytest.fixture(scope="module")
def dp2_reference(tmp_path_factory, dataset) -> Path:
    """Uninterrupted run on two data-parallel ranks."""
    trace, _ = _trained(
        tmp_path_factory.mktemp("dp2"),
        dataset,
        "ref",
        nproc=2,
        training={"train_steps": STEPS},
        logging={"tensorboard": True, "log_interval": 2},
    )
    return trace


@pytest.fixture(scope="module")
def single_reference(tmp_path_factory, dataset) -> Path:
    trace, _ = _trained(tmp_path_factory.mktemp("single"), dataset, "ref", training={"train_steps": 6})
    return trace


def test_reference_run_learns(dp2_reference):
    losses = _losses(dp2_reference, 0)
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.1
    assert _losses(dp2_reference, 1) == losses  # every rank knows the global loss
    ranks = [_steps(dp2_reference, r) for r in (0, 1)]
    assert all(ranks[0][s]["tokens_sha256"] != ranks[1][s]["tokens_sha256"] for s in ranks[0])  # disjoint shares


def test_reference_run_writes_tensorboard_scalars(dp2_reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(dp2_reference.parent / "ref" / "tensorboard"))
    events.Reload()
    losses = _losses(dp2_reference, 0)
    logged = {e.step: e.value for e in events.Scalars("train/lm_loss")}
    assert sorted(logged) == [2, 4, 6, 8]
    for step, value in logged.items():  # the mean over the log interval's steps
        assert value == pytest.approx((losses[step - 2] + losses[step - 1]) / 2, rel=1e-6)
    assert [e.step for e in events.Scalars("train/consumed_tokens")] == [2, 4, 6, 8]
    assert events.Scalars("train/consumed_tokens")[-1].value == STEPS * 8 * 16
    assert len(events.Scalars("train/params_norm")) == 4


@pytest.fixture(scope="module")
def stopped_at_step_4(tmp_path_factory, dataset) -> Path:
    """A DP=2 run that rank 0's SIGTERM stopped after step 4: its run directory and trace, kept pristine."""
    tmp = tmp_path_factory.mktemp("stopped")
    trace, out = _trained(
        tmp, dataset, "run", nproc=2, env_faults={"SFFN_FAULT_SIGNAL_AT_STEP": "4"}, training={"train_steps": STEPS}
    )
    assert "stopped by SIGTERM after step 4" in out
    assert (tmp / "run/checkpoints/latest").read_text().strip() == "step_0000004"
    assert sorted(_steps(trace)) == [1, 2, 3, 4]
    return tmp


def _resume_copy(stopped: Path, tmp_path: Path, dataset: Path, overrides: tuple[str, ...] = ()) -> tuple[Path, str]:
    shutil.copytree(stopped / "run", tmp_path / "run")
    shutil.copytree(stopped / "run.trace", tmp_path / "run.trace")
    return _trained(tmp_path, dataset, "run", nproc=2, overrides=overrides, training={"train_steps": STEPS})


def test_sigterm_then_resume_equals_uninterrupted_run(tmp_path, dataset, dp2_reference, stopped_at_step_4):
    trace, out = _resume_copy(stopped_at_step_4, tmp_path, dataset)
    assert "resumed from" in out and "at step 4" in out and "training complete" in out
    for rank in (0, 1):
        resumed, reference = _steps(trace, rank), _steps(dp2_reference, rank)
        assert sorted(resumed) == list(range(1, STEPS + 1))
        for step in range(1, STEPS + 1):
            assert abs(resumed[step]["loss"] - reference[step]["loss"]) <= 1e-6, (rank, step)
            assert resumed[step]["lr"] == reference[step]["lr"]
            assert resumed[step]["tokens_sha256"] == reference[step]["tokens_sha256"], (rank, step)


def test_resume_at_another_layout_continues_the_run(tmp_path, dataset, dp2_reference, stopped_at_step_4):
    """DP=2 checkpoint resumed at TP=2 x DP=1: weights, optimizer moments and data position all reshard."""
    trace, out = _resume_copy(stopped_at_step_4, tmp_path, dataset, ("parallel.tensor_parallel=2",))
    assert "at step 4" in out and "RNG streams re-seeded" in out
    resumed, reference = _steps(trace, 1), _steps(dp2_reference, 0)
    for step in range(5, STEPS + 1):
        assert resumed[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5, abs=1e-5), step


@pytest.mark.parametrize("layout", ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"])
def test_model_parallel_layouts_match_data_parallel(tmp_path, dataset, dp2_reference, layout):
    trace, out = _trained(
        tmp_path, dataset, "run", nproc=2, overrides=(layout,), training={"train_steps": STEPS}, eval={"at_end": True}
    )
    reference = _losses(dp2_reference, 0)
    last_rank = _losses(trace, 1)
    assert last_rank == pytest.approx(reference, rel=1e-5, abs=1e-5)
    if layout.startswith("parallel.tensor"):
        _check_tp2_checkpoint_evaluates_at_tp1(tmp_path, trace)


def _check_tp2_checkpoint_evaluates_at_tp1(tmp_path: Path, trace: Path) -> None:
    measured = [r for r in read_trace(trace / "rank0.jsonl") if "eval_step" in r][-1]
    assert measured["eval_step"] == STEPS
    report = tmp_path / "eval.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_sffn.evaluate",
            str(tmp_path / "run"),
            "parallel.tensor_parallel=1",
            "--json",
            str(report),
        ],
        cwd=REPO_ROOT,
        env=train_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    result = json.loads(report.read_text())
    assert result["saved_layout"]["tensor_parallel"] == 2 and result["layout"]["tensor_parallel"] == 1
    assert result["step"] == STEPS
    assert result["val_loss"] == pytest.approx(measured["val_loss"], rel=1e-6)
    assert result["val_tokens"] == measured["val_tokens"]
    assert result["val_perplexity"] == pytest.approx(math.exp(measured["val_loss"]), rel=1e-6)


def test_sigkill_during_save_leaves_latest_loadable(tmp_path, dataset, single_reference):
    config = write_config(
        tmp_path / "run.yaml",
        run_config(tmp_path / "run", dataset, training={"train_steps": 6}, checkpoint={"save_interval": 2}),
    )
    trace = tmp_path / "trace"
    log_path = tmp_path / "killed.log"
    env = train_env(trace, SFFN_FAULT_PAUSE_IN_SAVE="4:300")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            train_command(config, 1),
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 180
        try:
            while "SAVE-PAUSED" not in log_path.read_text():
                assert proc.poll() is None, log_path.read_text()[-4000:]
                assert time.monotonic() < deadline, "the save of step 4 never paused"
                time.sleep(0.2)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    ckpts = tmp_path / "run/checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_0000002"
    assert (ckpts / ".partial.step_0000004").is_dir()
    killed = _steps(trace)
    assert sorted(killed) == [1, 2, 3, 4]

    resumed_trace = tmp_path / "trace2"
    done = run_train(config, env=train_env(resumed_trace))
    assert done.returncode == 0, done.stdout[-6000:]
    assert "removed .partial.step_0000004" in done.stdout and "at step 2" in done.stdout
    resumed, reference = _steps(resumed_trace), _steps(single_reference)
    assert sorted(resumed) == [3, 4, 5, 6]
    for step in (3, 4):  # the restored state continues the killed run exactly
        assert resumed[step]["loss"] == killed[step]["loss"]
        assert resumed[step]["tokens_sha256"] == killed[step]["tokens_sha256"]
    for step in resumed:
        assert abs(resumed[step]["loss"] - reference[step]["loss"]) <= 1e-6
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_0000004", "step_0000006"]  # keep_last=2


def test_nonfinite_steps_are_skipped_and_a_streak_stops_the_run(tmp_path, dataset, single_reference):
    trace, out = _trained(
        tmp_path,
        dataset,
        "run",
        debug={"nonfinite_steps": [3, 5, 6]},  # the config's section
        expect_rc=1,
        training={"train_steps": 6, "max_consecutive_nonfinite": 2},
        checkpoint={"save_interval": 1},
    )
    assert "step 6: 2 consecutive steps had a non-finite loss or gradient" in out
    assert "training.max_consecutive_nonfinite=2" in out
    steps, reference = _steps(trace), _steps(single_reference)
    assert [steps[s]["skipped"] for s in range(1, 7)] == [False, False, True, False, True, True]
    for s in (1, 2):
        assert steps[s]["loss"] == reference[s]["loss"]
    assert math.isnan(steps[3]["loss"]) and steps[3]["grad_norm"] is None
    assert steps[3]["params_norm"] == steps[2]["params_norm"]  # no update
    assert steps[4]["params_norm"] != steps[3]["params_norm"]
    assert math.isfinite(steps[4]["loss"]) and math.isfinite(steps[4]["grad_norm"])  # moments stayed clean
    assert steps[6]["params_norm"] == steps[4]["params_norm"]
    latest = (tmp_path / "run/checkpoints/latest").read_text().strip()
    assert latest == "step_0000005"  # the diverged step 6 was not saved


def test_activation_recomputation_keeps_losses(tmp_path, dataset, single_reference):
    trace, _ = _trained(
        tmp_path,
        dataset,
        "run",
        training={
            "train_steps": 3,
            "recompute_granularity": "full",
            "recompute_method": "uniform",
            "recompute_num_layers": 1,
        },
    )
    recomputed, reference = _steps(trace), _steps(single_reference)
    for step in (1, 2, 3):
        assert recomputed[step]["loss"] == pytest.approx(reference[step]["loss"], abs=1e-6)


def _global_samples(trace: Path, step: int) -> list[str]:
    """The step's sample digests in global position order (rank r of R holds positions g % R == r)."""
    traced = [_steps(trace, rank) for rank in (0, 1) if (trace / f"rank{rank}.jsonl").exists()]
    per_rank = [steps[step]["sample_sha256"] for steps in traced if step in steps]
    return [per_rank[i % len(per_rank)][i // len(per_rank)] for i in range(sum(map(len, per_rank)))]


def test_raw_text_run_resumes_at_dp2_and_dp1_exactly_with_skip_counters_summed(tmp_path):
    """DP=2 on raw JSONL (bad documents skipped) stopped by SIGTERM after step 4, resumed at DP=2 and at DP=1.

    The reference for the data is the loader built here at DP=1 (the documented global order), for
    the losses an uninterrupted DP=1 run; every saved skip counter must equal the DP=1 loader's.
    """
    files, tokenizer = write_text_corpus(tmp_path / "corpus")
    glob = str(tmp_path / "corpus" / "part-*.jsonl")  # resolved at the first start, recorded in the run dir
    data = {"path": None, "raw": [glob], "tokenizer": tokenizer, "lanes": 4, "bad_documents": "skip"}
    sections = {"data": data, "training": {"train_steps": STEPS}, "checkpoint": {"save_interval": 4}}
    reference, _ = _trained(tmp_path, tmp_path, "ref", **sections)
    stopped, out = _trained(
        tmp_path, tmp_path, "run", nproc=2, env_faults={"SFFN_FAULT_SIGNAL_AT_STEP": "4"}, **sections
    )
    assert "stopped by SIGTERM after step 4" in out
    shutil.copy(files[0], tmp_path / "corpus" / "part-2.jsonl")  # the glob matches more now; resumes keep the list
    for resumed, nproc in (("dp2", 2), ("dp1", 1)):
        shutil.copytree(tmp_path / "run", tmp_path / resumed)
        shutil.copytree(stopped, tmp_path / f"{resumed}.trace")
        _trained(tmp_path, tmp_path, resumed, nproc=nproc, **sections)

    settings = text_settings(files, tokenizer, SEQ, bad_documents="skip")
    loader = build_text_train_loader(settings, StreamLayout(micro_batch_size=8), seed=7, lanes=4)
    batches = iter(loader)
    expected, skipped = {}, {}
    for step in range(1, STEPS + 1):
        expected[step] = sample_digests([next(batches)])
        skipped[step] = loader.stats.skipped_documents
    batches.close()
    assert 0 < skipped[4] < skipped[STEPS]

    ref_steps = _steps(reference)
    for name in ("ref", "dp2", "dp1"):
        trace, steps = tmp_path / f"{name}.trace", _steps(tmp_path / f"{name}.trace")
        assert sorted(steps) == list(range(1, STEPS + 1)), name
        for step in range(1, STEPS + 1):
            assert _global_samples(trace, step) == expected[step], (name, step)
            assert steps[step]["loss"] == pytest.approx(ref_steps[step]["loss"], rel=1e-5, abs=1e-5), (name, step)
        final = read_checkpoint_header(tmp_path / name / "checkpoints" / f"step_{STEPS:07d}")["data"]
        assert final["stats"]["skipped_documents"] == skipped[STEPS], name
    saved = read_checkpoint_header(tmp_path / "run/checkpoints/step_0000004")["data"]
    assert saved["stats"]["skipped_documents"] == skipped[4]
    assert sorted(saved["lane_state"]) == ["0", "1", "2", "3"]  # both ranks' lanes
