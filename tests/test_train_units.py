"""The trainer's single-process building blocks: checkpoint directory protocol, signals,
non-finite accounting, the debug section from the environment, LR schedule, step trace."""

from __future__ import annotations

import math
import os
import signal

import pytest

from megatron_sffn.config.loading import ConfigError, apply_overrides, from_dict
from megatron_sffn.config.train import DebugConfig, OptimizerConfig
from megatron_sffn.train import debug_overrides
from megatron_sffn.training.checkpoint_dirs import (
    LATEST_FILE,
    PARTIAL_PREFIX,
    CheckpointDirs,
    step_dir_name,
    step_of,
)
from megatron_sffn.training.nonfinite import NonFiniteTrainingError, record_step
from megatron_sffn.training.signals import StopRequest
from megatron_sffn.training.state import TrainProgress
from megatron_sffn.training.trace import StepTrace, read_trace


def _save(dirs: CheckpointDirs, step: int, payload: str = "weights") -> None:
    partial = dirs.begin(step)
    (partial / "data.bin").write_text(f"{payload}-{step}")
    dirs.commit(step)


# -- checkpoint directories ----------------------------------------------------------


def test_step_names_sort_by_step_and_parse_back():
    names = [step_dir_name(s) for s in (5, 40, 300, 12_000_000)]
    assert sorted(names) == names
    assert [step_of(n) for n in names] == [5, 40, 300, 12_000_000]
    assert step_of(".partial.step_0000005") is None and step_of("latest") is None


def test_partial_checkpoint_is_invisible_until_commit(tmp_path):
    dirs = CheckpointDirs(tmp_path)
    _save(dirs, 2)
    partial = dirs.begin(4)
    (partial / "data.bin").write_text("half written")
    assert dirs.latest().name == "step_0000002"
    assert [s for s, _ in dirs.committed()] == [2]
    dirs.commit(4)
    assert dirs.latest().name == "step_0000004"
    assert (tmp_path / LATEST_FILE).read_text() == "step_0000004\n"
    assert not partial.exists()


def test_a_failed_rename_of_the_partial_checkpoint_leaves_latest_on_the_previous_one(tmp_path, monkeypatch):
    """``latest`` may only move once the checkpoint carries its final name."""
    dirs = CheckpointDirs(tmp_path)
    _save(dirs, 2)
    partial = dirs.begin(4)
    (partial / "data.bin").write_text("complete")
    real_replace = os.replace

    def replace_failing_for_partials(src, dst, *args, **kwargs):
        if os.path.basename(src).startswith(PARTIAL_PREFIX):
            raise OSError(f"simulated failure renaming {src}")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace_failing_for_partials)
    with pytest.raises(OSError, match="simulated failure"):
        dirs.commit(4)
    assert (tmp_path / LATEST_FILE).read_text() == "step_0000002\n"
    assert dirs.latest().name == "step_0000002"
    assert partial.is_dir() and not (tmp_path / "step_0000004").exists()


def test_clean_stale_removes_interrupted_saves_and_deletions_only(tmp_path):
    dirs = CheckpointDirs(tmp_path)
    _save(dirs, 2)
    dirs.begin(4)
    (tmp_path / ".deleting.step_0000001").mkdir()
    removed = sorted(p.name for p in dirs.clean_stale())
    assert removed == [".deleting.step_0000001", ".partial.step_0000004"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST_FILE, "step_0000002"]
    assert dirs.latest().name == "step_0000002"


def test_prune_keeps_the_newest_k(tmp_path):
    dirs = CheckpointDirs(tmp_path)
    for step in (1, 2, 3, 4, 5):
        _save(dirs, step)
        dirs.prune(2)
    assert [s for s, _ in dirs.committed()] == [4, 5]
    assert dirs.prune(None) == []
    with pytest.raises(ValueError, match="keep_last=0"):
        dirs.prune(0)


def test_prune_never_removes_the_checkpoint_latest_names(tmp_path):
    dirs = CheckpointDirs(tmp_path)
    for step in (3, 4, 5):
        _save(dirs, step)
    (tmp_path / LATEST_FILE).write_text("step_0000003\n")  # e.g. a run rolled back by hand
    dirs.prune(1)
    assert [s for s, _ in dirs.committed()] == [3, 5]


def test_resaving_a_step_replaces_it_whole(tmp_path):
    dirs = CheckpointDirs(tmp_path)
    _save(dirs, 6, "first")
    _save(dirs, 6, "second")
    assert (dirs.latest() / "data.bin").read_text() == "second-6"
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST_FILE, "step_0000006"]


def test_latest_pointing_at_a_missing_directory_is_an_error_not_a_fresh_start(tmp_path):
    dirs = CheckpointDirs(tmp_path)
    assert dirs.latest() is None
    _save(dirs, 2)
    (tmp_path / LATEST_FILE).write_text("step_0000009\n")
    with pytest.raises(ValueError, match="step_0000009.*does not exist.*step_0000002"):
        dirs.latest()
    (tmp_path / LATEST_FILE).write_text("garbage\n")
    with pytest.raises(ValueError, match="garbage"):
        dirs.latest()


def test_latest_file_honours_the_umask(tmp_path):
    dirs = CheckpointDirs(tmp_path)
    old = os.umask(0o022)
    try:
        _save(dirs, 1)
    finally:
        os.umask(old)
    assert (tmp_path / LATEST_FILE).stat().st_mode & 0o777 == 0o644


# -- signals and non-finite accounting -------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_request_records_the_signal_instead_of_dying(sig):
    with StopRequest() as stop:
        assert stop.flag == 0.0
        os.kill(os.getpid(), sig)
        assert stop.received == sig and stop.flag == 1.0
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing
        assert stop.received == sig
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_nonfinite_streak_stops_at_the_limit_and_resets_on_a_good_step():
    progress = TrainProgress()
    for nonfinite in (True, False, True):
        progress.step += 1
        record_step(progress, nonfinite, max_consecutive=2)
    assert (progress.skipped_steps, progress.consecutive_nonfinite) == (2, 1)
    progress.step += 1
    with pytest.raises(NonFiniteTrainingError, match=r"step 4: 2 consecutive.*max_consecutive_nonfinite=2"):
        record_step(progress, True, max_consecutive=2)


def test_progress_round_trips_and_rejects_incomplete_records():
    progress = TrainProgress(step=7, consumed_samples=56, consumed_tokens=896, skipped_steps=1)
    assert TrainProgress.from_state_dict(progress.state_dict()) == progress
    with pytest.raises(ValueError, match="consumed_tokens"):
        TrainProgress.from_state_dict({"step": 1})
    shared = TrainProgress()
    shared.load_state_dict(progress.state_dict())  # in place: the training plans' parts hold this object
    assert shared == progress


# -- fault injection -------------------------------------------------------------------


def _debug_of(env: dict[str, str], *overrides: str) -> DebugConfig:
    """The debug section the command line builds from ``env`` and its own ``overrides``."""
    data = apply_overrides({}, [*debug_overrides(env), *overrides])
    return from_dict(DebugConfig, data.get("debug", {}), source="command line")


def test_fault_environment_becomes_the_debug_section_and_names_bad_values(tmp_path):
    debug = _debug_of(
        {
            "SFFN_FAULT_NONFINITE_STEPS": "3, 5",
            "SFFN_FAULT_SIGNAL_AT_STEP": "4:SIGUSR1",
            "SFFN_FAULT_PAUSE_IN_SAVE": "6:2.5",
            "SFFN_STEP_TRACE": str(tmp_path / "yes"),
        }
    )
    assert debug == DebugConfig(
        step_trace=str(tmp_path / "yes"),
        nonfinite_steps=[3, 5],
        signal_at_step=4,
        signal="SIGUSR1",
        pause_in_save_step=6,
        pause_in_save_s=2.5,
    )
    assert _debug_of({}) == DebugConfig() and debug_overrides({"SFFN_FAULT_NONFINITE_STEPS": " "}) == []
    assert _debug_of({"SFFN_FAULT_SIGNAL_AT_STEP": "4"}).signal == "SIGTERM"
    assert _debug_of({"SFFN_FAULT_SIGNAL_AT_STEP": "4"}, "debug.signal_at_step=7").signal_at_step == 7  # override wins
    for env, match in (
        ({"SFFN_FAULT_NONFINITE_STEPS": "3,x"}, "SFFN_FAULT_NONFINITE_STEPS.*'x'"),
        ({"SFFN_FAULT_SIGNAL_AT_STEP": "x:SIGUSR1"}, "SFFN_FAULT_SIGNAL_AT_STEP.*'x'"),
        ({"SFFN_FAULT_SIGNAL_AT_STEP": "4:SIGNOPE"}, "signal='SIGNOPE': unknown signal"),
        ({"SFFN_FAULT_PAUSE_IN_SAVE": "4"}, "SFFN_FAULT_PAUSE_IN_SAVE='4': expected STEP:SECONDS"),
        ({"SFFN_FAULT_NONFINITE_STEPS": "0"}, "nonfinite_steps=.0. must list positive steps"),
    ):
        with pytest.raises(ValueError, match=match):
            _debug_of(env)
    with pytest.raises(ConfigError, match=r"command line:corrupt_loss: unknown key in section DebugConfig"):
        _debug_of({}, "debug.corrupt_loss=true")


# -- learning-rate schedule ------------------------------------------------------------


class _FakeOptimizer:
    def __init__(self) -> None:
        self.param_groups = [{"params": []}]


def _lrs(opt_cfg: OptimizerConfig, train_steps: int, warmup: int) -> list[float]:
    from megatron_sffn.training.schedule import build_lr_scheduler

    optimizer = _FakeOptimizer()
    scheduler = build_lr_scheduler(optimizer, opt_cfg, train_steps, warmup)
    rates = []
    for _ in range(train_steps):
        scheduler.step(increment=1)  # the loop's convention: before update k, lr(k)
        rates.append(optimizer.param_groups[0]["lr"])
    return rates


def test_lr_schedule_warms_up_linearly_then_follows_a_cosine_to_the_minimum():
    cfg = OptimizerConfig(lr=1e-3, min_lr_ratio=0.1, warmup_steps=4)
    rates = _lrs(cfg, train_steps=20, warmup=4)
    assert rates[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    for k in range(5, 21):  # independent cosine formula
        progress = (k - 4) / 16
        expected = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * progress))
        assert rates[k - 1] == pytest.approx(expected, rel=1e-12)
    assert rates[-1] == pytest.approx(1e-4)


def test_lr_schedule_linear_and_constant_styles():
    linear = _lrs(OptimizerConfig(lr=1e-3, min_lr_ratio=0.0, warmup_steps=0, decay_style="linear"), 10, 0)
    assert linear == pytest.approx([1e-3 * (1 - k / 10) for k in range(1, 11)])
    constant = _lrs(OptimizerConfig(lr=1e-3, warmup_steps=2, decay_style="constant"), 6, 2)
    assert constant == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3])


def test_lr_schedule_rejects_a_warmup_as_long_as_the_run():
    from megatron_sffn.training.schedule import build_lr_scheduler

    with pytest.raises(ValueError, match="warmup of 10 steps must be shorter than the run's 10 steps"):
        build_lr_scheduler(_FakeOptimizer(), OptimizerConfig(warmup_steps=10), 10, 10)


# -- step trace --------------------------------------------------------------------------


def test_step_trace_round_trips_floats_exactly(tmp_path):
    trace = StepTrace(3, str(tmp_path))
    values = [1 / 3, math.nan, 4.123456789012345]
    for step, loss in enumerate(values, start=1):
        trace.write(step=step, loss=loss, skipped=False)
    records = read_trace(tmp_path / "rank3.jsonl")
    assert records[0]["loss"] == 1 / 3 and math.isnan(records[1]["loss"]) and records[2]["loss"] == values[2]
    assert not StepTrace(0, "").enabled


# -- checkpoint / config compatibility -----------------------------------------------------


def test_checkpoint_of_another_model_is_rejected_naming_the_differing_keys(tmp_path):
    import copy

    from megatron_sffn.config.loading import from_dict, save_config
    from megatron_sffn.config.train import TrainConfig
    from megatron_sffn.training.checkpointing import CONFIG_FILE, check_same_model
    from tests.workers.train_checks import run_config

    raw = run_config(tmp_path / "run", tmp_path / "data")
    saved = from_dict(TrainConfig, copy.deepcopy(raw))
    save_config(saved, tmp_path / CONFIG_FILE)
    raw["training"]["micro_batch_size"] = 4  # not part of the model: accepted
    check_same_model(tmp_path, from_dict(TrainConfig, copy.deepcopy(raw)))
    raw["model"]["ffn"]["rank"] = 32
    with pytest.raises(ValueError, match=r"different model.*model\.ffn\.rank: checkpoint 16, this run 32"):
        check_same_model(tmp_path, from_dict(TrainConfig, raw))
