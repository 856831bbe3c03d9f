"""``python -m megatron_sffn.train`` rejects inconsistent launches before any heavy work.

Each case must exit with status 2 and a message naming the key and value at
fault, without creating the run directory (the resolved config is written
only once set-up starts) and without reaching the training loop.  The
command line is also the only reader of the environment: the debug section
from the fault and trace variables, the launcher's stop record.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from megatron_sffn import train
from megatron_sffn.training import loop
from megatron_sffn.training.model_setup import fused_adam_available
from megatron_sffn.training.state import TrainProgress
from tests.workers.train_checks import run_config, write_config, write_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), train_samples=64, val_samples=16)


def _never_called(*args, **kwargs):
    raise AssertionError("the training loop started although the launch is inconsistent")


CASES = [
    # (overrides, world size, expected message fragments)
    (["training.trian_steps=5"], 1, ["training.trian_steps", "unknown key"]),
    (
        ["training.global_batch_size=8", "training.micro_batch_size=2"],
        3,
        ["training.global_batch_size=8", "data-parallel size 3"],
    ),
    (["parallel.tensor_parallel=2"], 3, ["world size 3", "parallel.tensor_parallel=2"]),
    (["parallel.pipeline_parallel=3"], 3, ["model.num_layers=4", "parallel.pipeline_parallel=3"]),
    (
        ["model.num_attention_heads=3", "model.kv_channels=16", "parallel.tensor_parallel=2"],
        2,
        ["num_attention_heads=3", "parallel.tensor_parallel=2"],
    ),
    (["model.seq_length=32"], 1, ["model.seq_length=32", "context_length=16"]),
    (["model.vocab_size=64"], 1, ["model.vocab_size=64", "128"]),
    (["data.lanes=6"], 4, ["data.lanes=6", "data-parallel size 4"]),
    (["data.path=/nonexistent/dataset"], 1, ["/nonexistent/dataset"]),
    (["checkpoint.load=/nonexistent/run"], 1, ["/nonexistent/run"]),
    (["training.warmup_steps=3"], 1, ["training.warmup_steps"]),
    (["optimizer.warmup_steps=2", "optimizer.warmup_fraction=0.1"], 1, ["warmup_fraction=0.1", "warmup_steps=2"]),
    (["optimizer.warmup_steps=6"], 1, ["warmup of 6 steps", "6 steps", "optimizer.warmup_steps"]),
    # the checks that need the sharding plan, the SGT accounting or the EST draws
    (
        ["model.ffn.structure=blockshuffle", "model.ffn.blocks=2", "parallel.tensor_parallel=4"],
        4,
        ["model.ffn (structure=blockshuffle", "blocks=2", "parallel.tensor_parallel=4"],
    ),
    (
        ["sgt.enabled=true", "sgt.mode=same_flops", "sgt.guided_fraction=1.0", "sgt.stochastic=false"],
        1,
        ["sgt: ", "guided_fraction=1.0", "no same-FLOPs run exists"],
    ),
    (["est.enabled=true", "est.tensor_strata=3"], 1, ["est.tensor_strata=3", "model.num_attention_heads=4"]),
    pytest.param(
        ["parallel.use_distributed_optimizer=true"],
        1,
        ["parallel.use_distributed_optimizer=true", "fused Adam"],
        marks=pytest.mark.skipif(fused_adam_available(), reason="Transformer Engine or Apex is installed"),
    ),
]


def _case_id(case) -> str:
    return (case.values if hasattr(case, "values") else case)[0][0]


@pytest.mark.parametrize("overrides,world_size,fragments", CASES, ids=[_case_id(c) for c in CASES])
def test_inconsistent_launch_fails_before_setup(
    tmp_path, dataset, monkeypatch, capsys, overrides, world_size, fragments
):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", run_config(run_dir, dataset))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setattr(loop, "run_training", _never_called)
    assert train.main([str(config), *overrides]) == 2
    message = capsys.readouterr().err
    assert message.startswith("error: ")
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from: {message}"
    assert not run_dir.exists()


def test_empty_validation_split_is_reported_when_evaluations_are_asked_for(tmp_path, monkeypatch, capsys):
    data = write_dataset(tmp_path / "data", train_samples=64, val_samples=0)
    config = write_config(tmp_path / "run.yaml", run_config(tmp_path / "run", data, eval={"at_end": True}))
    monkeypatch.setattr(loop, "run_training", _never_called)
    assert train.main([str(config)]) == 2
    assert "empty validation split" in capsys.readouterr().err
    calls = []
    monkeypatch.setattr(loop, "run_training", lambda cfg: calls.append(cfg))
    assert train.main([str(config), "eval.at_end=false"]) == 0 and calls


def test_consistent_launch_reaches_the_loop(tmp_path, dataset, monkeypatch):
    """The same harness lets a valid config through, so the cases above fail for their own reason."""
    calls = []
    config = write_config(tmp_path / "run.yaml", run_config(tmp_path / "run", dataset))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(loop, "run_training", lambda cfg: calls.append(cfg))
    assert train.main([str(config), "parallel.tensor_parallel=2"]) == 0
    assert calls[0].parallel.tensor_parallel == 2


# -- the environment, read at the command line only ---------------------------------------------


def _env_reads(source: str) -> set[str]:
    """Names read with ``os.environ[...]``, ``.get(...)`` (or an ``env`` mapping's), ``in os.environ``."""
    constants = dict(re.findall(r'^([A-Z_]+) = "([A-Z][A-Z0-9_]+)"', source, flags=re.M))
    names = re.findall(r'(?:os\.environ|\benv)(?:\.get\(|\[)\s*"?([A-Za-z_][A-Za-z0-9_]*)"?', source)
    names += re.findall(r'"([A-Z][A-Z0-9_]+)" in os\.environ', source)
    return {constants.get(name, name) for name in names}


def test_help_lists_every_environment_variable_the_command_line_reads(capsys):
    read = _env_reads(Path(train.__file__).read_text())
    assert {"SFFN_STEP_TRACE", "SFFN_STOP_RECORD", "WORLD_SIZE", "LOCAL_RANK"} <= read
    fault_vars = {train.ENV_NONFINITE_STEPS, train.ENV_SIGNAL_AT_STEP, train.ENV_PAUSE_IN_SAVE}
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    out = capsys.readouterr().out
    missing = sorted(name for name in read | fault_vars if not re.search(rf"^\s+(\S+, )*{name}\b", out, flags=re.M))
    assert not missing, f"--help does not list {missing}:\n{out}"


def test_the_trainer_reads_only_the_launchers_process_identity_from_the_environment():
    package = Path(train.__file__).parent / "training"
    read = {name for path in package.glob("*.py") for name in _env_reads(path.read_text())}
    assert read <= {"WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"}, read


def test_environment_fills_the_debug_section_and_overrides_win(tmp_path, dataset, monkeypatch, capsys):
    config = write_config(tmp_path / "run.yaml", run_config(tmp_path / "run", dataset))
    monkeypatch.setenv("SFFN_STEP_TRACE", str(tmp_path / "trace"))
    monkeypatch.setenv("SFFN_FAULT_SIGNAL_AT_STEP", "3:SIGUSR1")
    monkeypatch.setenv("SFFN_FAULT_NONFINITE_STEPS", "2")
    calls = []
    monkeypatch.setattr(loop, "run_training", lambda cfg: calls.append(cfg))
    assert train.main([str(config), "debug.nonfinite_steps=[4,5]"]) == 0
    debug = calls[0].debug
    assert (debug.step_trace, debug.signal_at_step, debug.signal) == (str(tmp_path / "trace"), 3, "SIGUSR1")
    assert debug.nonfinite_steps == [4, 5]
    monkeypatch.setenv("SFFN_FAULT_PAUSE_IN_SAVE", "soon")
    monkeypatch.setattr(loop, "run_training", _never_called)
    assert train.main([str(config)]) == 2
    assert "SFFN_FAULT_PAUSE_IN_SAVE='soon': expected STEP:SECONDS" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_command_line_writes_the_stop_record_for_the_launcher(tmp_path, dataset, monkeypatch):
    config = write_config(tmp_path / "run.yaml", run_config(tmp_path / "run", dataset))
    outcome = loop.TrainOutcome(TrainProgress(step=4), "SIGTERM", tmp_path / "ckpt", None)
    monkeypatch.setattr(loop, "run_training", lambda cfg: outcome)
    monkeypatch.setenv("SFFN_STOP_RECORD", str(tmp_path / "stop.json"))
    assert train.main([str(config)]) == 0
    record = json.loads((tmp_path / "stop.json").read_text())
    assert record == {"stopped_by": "SIGTERM", "step": 4, "checkpoint": str(tmp_path / "ckpt")}
    monkeypatch.setenv("LOCAL_RANK", "1")  # one record per node: the other local ranks leave it alone
    (tmp_path / "stop.json").unlink()
    assert train.main([str(config)]) == 0 and not (tmp_path / "stop.json").exists()
