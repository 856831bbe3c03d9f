"""``python -m megatron_sffn.train`` rejects inconsistent launches before any heavy work.

Each case must exit with status 2 and a message naming the key and value at
fault, without creating the run directory (the resolved config is written
only once set-up starts) and without reaching the training loop.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_sffn import train
from megatron_sffn.training import loop
from megatron_sffn.training.model_setup import fused_adam_available
from tests.workers.train_checks import run_config, write_config, write_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), train_samples=64, val_samples=16)


def _never_called(*args, **kwargs):
    raise AssertionError("the training loop started although the launch is inconsistent")


CASES = [
    # (overrides, world size, expected message fragments)
    (["training.trian_steps=5"], 1, ["training.trian_steps", "unknown key"]),
    (["training.global_batch_size=8", "training.micro_batch_size=2"], 3,
     ["training.global_batch_size=8", "data-parallel size 3"]),
    (["parallel.tensor_parallel=2"], 3, ["world size 3", "parallel.tensor_parallel=2"]),
    (["parallel.pipeline_parallel=3"], 3, ["model.num_layers=4", "parallel.pipeline_parallel=3"]),
    (["model.num_attention_heads=3", "model.kv_channels=16", "parallel.tensor_parallel=2"], 2,
     ["num_attention_heads=3", "parallel.tensor_parallel=2"]),
    (["model.seq_length=32"], 1, ["model.seq_length=32", "context_length=16"]),
    (["model.vocab_size=64"], 1, ["model.vocab_size=64", "128"]),
    (["data.lanes=6"], 4, ["data.lanes=6", "data-parallel size 4"]),
    (["data.path=/nonexistent/dataset"], 1, ["/nonexistent/dataset"]),
    (["checkpoint.load=/nonexistent/run"], 1, ["/nonexistent/run"]),
    (["training.warmup_steps=3"], 1, ["training.warmup_steps"]),
    (["optimizer.warmup_steps=2", "optimizer.warmup_fraction=0.1"], 1, ["warmup_fraction=0.1", "warmup_steps=2"]),
    (["optimizer.warmup_steps=6"], 1, ["warmup of 6 steps", "6 steps", "optimizer.warmup_steps"]),
    # the checks that need the sharding plan, the SGT accounting or the EST draws
    (["model.ffn.structure=blockshuffle", "model.ffn.blocks=2", "parallel.tensor_parallel=4"], 4,
     ["model.ffn (structure=blockshuffle", "blocks=2", "parallel.tensor_parallel=4"]),
    (["sgt.enabled=true", "sgt.mode=same_flops", "sgt.guided_fraction=1.0", "sgt.stochastic=false"], 1,
     ["sgt: ", "guided_fraction=1.0", "no same-FLOPs run exists"]),
    (["est.enabled=true", "est.tensor_strata=3"], 1, ["est.tensor_strata=3", "model.num_attention_heads=4"]),
    pytest.param(
        ["parallel.use_distributed_optimizer=true"], 1, ["parallel.use_distributed_optimizer=true", "fused Adam"],
        marks=pytest.mark.skipif(fused_adam_available(), reason="Transformer Engine or Apex is installed"),
    ),
]  # fmt: skip


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
