"""SUPRA uptraining end to end through ``python -m megatron_sffn.train``, compared with independent runs.

* a softmax run's checkpoint starts a SUPRA run: every inherited weight loads and the new ones are reported;
* TP=2 and PP=2 uptraining == TP=1, loss by loss;
* SIGTERM mid-uptraining, then resume == uninterrupted;
* a homogeneous (dense) softmax checkpoint starts a hybrid SUPRA model (layers keyed differently);
* evaluating a softmax checkpoint right after the swap gives the same loss at TP=2 as at TP=1;
* a checkpoint of another shape is refused before any set-up.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_sffn.config.loading import from_dict
from megatron_sffn.config.train import TrainConfig
from megatron_sffn.train import preflight
from tests.test_train_runs import _losses, _steps, _trained
from tests.workers.train_checks import REPO_ROOT, run_config, train_env, write_dataset

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]
STEPS = 4
SUPRA = ("model.attention=supra", "model.supra.chunk_size=4")
GQA = {"num_query_groups": 2}  # keys get their own feature map, split over TP=2 as well


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def softmax_run(tmp_path_factory, dataset) -> Path:
    """A softmax LowRank run (dense layer 0) of 3 steps: the checkpoint every uptraining starts from."""
    tmp = tmp_path_factory.mktemp("softmax")
    _trained(tmp, dataset, "run", training={"train_steps": 3}, model=GQA)
    return tmp / "run"


def _uptrain(
    tmp: Path,
    dataset: Path,
    softmax: Path,
    *,
    name: str = "up",
    nproc: int = 1,
    overrides: tuple[str, ...] = (),
    model: dict | None = None,
    **kwargs,
) -> tuple[Path, str]:
    return _trained(
        tmp,
        dataset,
        name,
        nproc=nproc,
        training={"train_steps": STEPS},
        model=model or GQA,
        overrides=(*SUPRA, f"checkpoint.load={softmax}", *overrides),
        **kwargs,
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dataset, softmax_run) -> tuple[Path, str]:
    return _uptrain(tmp_path_factory.mktemp("ref"), dataset, softmax_run)


def test_uptraining_loads_every_softmax_weight_and_reports_the_new_ones(reference):
    trace, out = reference
    assert "SUPRA uptraining: every softmax weight loaded" in out
    layers = "in local layers 0, 1, 2, 3"
    names = "; ".join(f"feature_map{k}.{w} {layers}" for k in ("", "_k") for w in ("bias", "weight"))
    assert f"16 new tensors ({names})" in out
    losses = _losses(trace, 0)
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize("layout", ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"])
def test_model_parallel_uptraining_equals_tp1(tmp_path, dataset, softmax_run, reference, layout):
    trace, _ = _uptrain(tmp_path, dataset, softmax_run, nproc=2, overrides=(layout,))
    assert _losses(trace, 1) == pytest.approx(_losses(reference[0], 0), rel=1e-5, abs=1e-5)


def test_sigterm_and_resume_mid_uptraining_equals_uninterrupted(tmp_path, dataset, softmax_run, reference):
    _, out = _uptrain(tmp_path, dataset, softmax_run, env_faults={"SFFN_FAULT_SIGNAL_AT_STEP": "2"})
    assert "stopped by SIGTERM after step 2" in out
    trace, out = _uptrain(tmp_path, dataset, softmax_run)
    assert "resumed from" in out and "at step 2" in out and "SUPRA uptraining" not in out
    resumed, uninterrupted = _steps(trace), _steps(reference[0])
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert abs(resumed[step]["loss"] - uninterrupted[step]["loss"]) <= 1e-6, step
        assert resumed[step]["tokens_sha256"] == uninterrupted[step]["tokens_sha256"], step


def test_dense_softmax_checkpoint_starts_a_hybrid(tmp_path, dataset):
    """Identical dense layers are stored stacked; a hybrid keys its layers apart and must still load them all."""
    dense = {"ffn": {"structure": "dense"}}
    _trained(tmp_path, dataset, "dense", training={"train_steps": 3}, model=dense)
    trace, out = _uptrain(
        tmp_path,
        dataset,
        tmp_path / "dense",
        name="hybrid",
        model=dense,
        overrides=("model.supra.every=2", "training.train_steps=3"),
    )
    assert "4 new tensors (feature_map.bias in local layers 1, 3; feature_map.weight in local layers 1, 3)" in out
    assert len(_losses(trace, 0)) == 3


def test_checkpoint_of_another_shape_is_refused_before_set_up(tmp_path, dataset, softmax_run):
    config = run_config(
        tmp_path / "up",
        dataset,
        model={**GQA, "attention": "supra", "num_layers": 2},
        checkpoint={"load": str(softmax_run)},
    )
    with pytest.raises(ValueError, match=r"model.num_layers: checkpoint 4, this run 2"):
        preflight(from_dict(TrainConfig, config), world_size=1)
    assert not (tmp_path / "up").exists()
    # SUPRA options do not matter to a softmax run.
    softmax = run_config(
        tmp_path / "up", dataset, model={**GQA, "supra": {"chunk_size": 8}}, checkpoint={"load": str(softmax_run)}
    )
    preflight(from_dict(TrainConfig, softmax), world_size=1)


def test_evaluation_right_after_the_swap_is_the_same_at_tp2(tmp_path, softmax_run):
    """The new weights' initialisation and the SUPRA forward do not depend on the TP size."""
    losses = []
    for nproc in (1, 2):
        out = tmp_path / f"tp{nproc}.json"
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
        command = [
            sys.executable,
            *launcher,
            "-m",
            "megatron_sffn.evaluate",
            str(softmax_run),
            "model.attention=supra",
            f"parallel.tensor_parallel={nproc}",
            "--json",
            str(out),
        ]
        done = subprocess.run(command, cwd=REPO_ROOT, env=train_env(), capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
        losses.append(json.loads(out.read_text())["val_loss"])
    assert math.isfinite(losses[0]) and losses[1] == pytest.approx(losses[0], rel=1e-5)
