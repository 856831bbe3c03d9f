"""The dry run: layouts it refuses and why, its parameter/throughput arithmetic, and its memory estimate
against the memory a real tiny run uses.

Memory comparison, precisely: the estimate for configs/tiny.yaml at one CPU
process (weights + gradients + optimizer state + activations of the
micro-batch in flight + logits and first gradients) is compared with the peak
of *live tensor bytes* during the training steps of a real run of the same
config: every storage created by an ATen op is counted from its creation
until it is freed (a ``TorchDispatchMode`` plus a finaliser per storage).
That is the CPU counterpart of ``torch.cuda.max_memory_allocated``: it leaves
out the allocator's caching and fragmentation and the Python/library heap,
which no tensor-level estimate can predict.  Checkpoint saving runs outside
the measured window (the estimate is of training).  The process's peak RSS
growth is reported beside it for context only.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import weakref
from pathlib import Path

import pytest

from megatron_sffn.accounting.model import count_parameters, dense_counterpart, training_flops_per_token
from megatron_sffn.config.loading import load_config
from megatron_sffn.config.train import TrainConfig
from megatron_sffn.planning import devices, memory, report
from megatron_sffn.planning.plan import plan_run
from tests.test_launch import REPO_ROOT, TINY, build_dataset, tiny_context_length

CONFIGS = REPO_ROOT / "configs"
MEASURE_TIMEOUT_S = 300
MEMORY_TOLERANCE = 0.25


def config(path: Path, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, path, ["logging.peak_tflops_per_device=100", *overrides])


def run_main(*args: str, capsys) -> tuple[int, str, str]:
    status = report.main([*map(str, args), "logging.peak_tflops_per_device=100"])
    out = capsys.readouterr()
    return status, out.out, out.err


# -- arithmetic ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        TINY,
        CONFIGS / "tiny_dense.yaml",
        CONFIGS / "paper" / "m_blockdense63.yaml",
        CONFIGS / "paper" / "s_blockshuffle32.yaml",
    ],
    ids=lambda p: p.stem,
)
def test_one_rank_holds_every_parameter(path):
    """At TP=1 the per-stage count must add up to the independent whole-model count (accounting)."""
    model = config(path).model
    total = count_parameters(model).total
    assert memory.stage_params_per_rank(model, tp=1, pp=1, stage=0) == total
    two_stages = [memory.stage_params_per_rank(model, tp=1, pp=2, stage=s) for s in (0, 1)]
    tied_copy = model.vocab_size * model.hidden_size  # the last stage's copy of the tied embedding
    assert sum(two_stages) == total + tied_copy


def test_tensor_parallel_splits_match_the_module_plan():
    """The one-rank shortcut agrees with the TP plan the FFN modules are built from, at TP=1."""
    from megatron_sffn.parallel.plan import FFNShape, choose_strategy, rank_cost

    model = config(CONFIGS / "paper" / "s_lowrank32.yaml").model
    shape = FFNShape("lowrank", model.hidden_size, model.ffn_hidden_size, model.ffn.rank)
    strategy = choose_strategy(shape, 1, model.ffn.tp_strategy)
    assert memory._ffn_params_per_rank(model, "lowrank", 1) == rank_cost(shape, strategy, 1).params
    per_rank = [memory.stage_params_per_rank(model, tp, 1, 0) for tp in (1, 2, 4)]
    assert per_rank[0] > per_rank[1] > per_rank[2] > per_rank[0] / 4, "TP shards most, but not all, parameters"


def test_activation_settings_order_and_pipeline_in_flight():
    cfg = config(CONFIGS / "paper" / "m_lowrank32.yaml", "parallel.pipeline_parallel=4", "training.micro_batch_size=2")
    none, selective, full = (
        memory.stage_activation_bytes(cfg, 0, 2, setting, "uniform", 1) for setting in (None, "selective", "full")
    )
    assert none > selective > full > 0
    plan = plan_run(cfg, 16, device="H100")
    micro_batches = plan.layout.micro_batches
    assert [s.in_flight for s in plan.stages] == [min(4 - s, micro_batches) for s in range(4)]
    assert [s.output_and_loss > 0 for s in plan.stages] == [False, False, False, True]
    assert plan.stages[0].activations == plan.stages[0].in_flight * plan.stages[0].activations_per_micro_batch


def test_distributed_optimizer_shards_only_the_optimizer_state():
    cfg = config(CONFIGS / "paper" / "s_dense.yaml")
    sharded = plan_run(cfg, 8, device="A100-SXM4-80GB").stages[0]  # the GPU default
    cfg.parallel.use_distributed_optimizer = False
    unsharded = plan_run(cfg, 8, device="A100-SXM4-80GB").stages[0]
    params = sharded.params
    assert (sharded.weights, sharded.gradients) == (unsharded.weights, unsharded.gradients) == (2 * params, 4 * params)
    assert unsharded.optimizer == 12 * params and sharded.optimizer == 12 * params // 8


def test_expected_throughput_uses_the_structured_flops():
    cfg = config(CONFIGS / "paper" / "s_lowrank32.yaml")
    plan = plan_run(cfg, 8, device="H100", assumed_mfu=0.5)
    flops = training_flops_per_token(cfg.model)
    assert plan.throughput.training_flops_per_token == flops < training_flops_per_token(dense_counterpart(cfg.model))
    assert plan.throughput.tokens_per_second == pytest.approx(0.5 * 100e12 * 8 / flops)
    assert plan.throughput.run_seconds == pytest.approx(plan.layout.train_tokens / plan.throughput.tokens_per_second)


@pytest.mark.parametrize(
    "name, memory_gib, bf16_tflops",
    [
        ("NVIDIA A100-SXM4-40GB", 40.0, 312.0),
        ("NVIDIA H100 NVL", 94.0, 835.5),
        ("NVIDIA H100 80GB HBM3", 80.0, 989.5),
        ("NVIDIA H200", 141.0, 989.5),
        ("NVIDIA B200", 180.0, 2250.0),
        ("NVIDIA GB200", 186.0, 2500.0),
        ("AMD Instinct MI300X", 192.0, 1307.4),
        ("NVIDIA L40S", 48.0, 362.05),
        ("L40", 48.0, 181.05),
    ],
)
def test_known_devices_plan_with_their_datasheet_figures(name, memory_gib, bf16_tflops):
    device = devices.resolve_device(name, precision_on_gpu="bf16")
    assert device.memory_bytes == int(memory_gib * 1024**3) and device.peak_flops == bf16_tflops * 1e12


def test_an_unknown_device_is_refused_listing_the_known_ones(capsys):
    status, out, err = run_main(TINY, "--device", "H1000", capsys=capsys)
    assert status == 2 and "OK" not in out
    assert "'H1000' is not a device" in err and "H100, " in err and "B200" in err and "MI300X" in err
    with pytest.raises(ValueError, match="'H100X'"):
        devices.resolve_device("H100X", precision_on_gpu="bf16")
    # an unlisted device can still be planned from explicit figures
    device = devices.resolve_device("Custom9", precision_on_gpu="bf16", memory_gib=64, peak_tflops=500)
    assert (device.memory_bytes, device.peak_flops) == (64 * 1024**3, 500e12)


def test_dense_override_drops_the_structured_sizes(capsys):
    model = config(CONFIGS / "paper" / "s_lowrank32.yaml", "model.ffn.structure=dense").model
    assert (model.ffn.rank, model.ffn.blocks) == (None, None)
    assert model == config(CONFIGS / "paper" / "s_dense.yaml").model
    status, out, _ = run_main(
        CONFIGS / "paper" / "s_blockdense32.yaml",
        "model.ffn.structure=dense",
        "--device",
        "H100",
        "--world-size",
        "8",
        capsys=capsys,
    )
    assert status == 0 and "FFN structure: dense\n" in out
    shuffled = config(CONFIGS / "paper" / "s_blockdense32.yaml", "model.ffn.structure=blockshuffle").model
    assert shuffled.ffn.rank is None and shuffled.ffn.blocks is not None


# -- the command: report and refusals ----------------------------------------------------------------


def test_report_names_layout_memory_and_speed(capsys):
    status, out, _ = run_main(
        CONFIGS / "paper" / "m_lowrank32.yaml",
        "--world-size",
        "16",
        "--device",
        "H100",
        "parallel.tensor_parallel=2",
        "training.micro_batch_size=8",
        capsys=capsys,
    )
    assert status == 0, out
    for fragment in (
        "TP 2 x PP 1 x DP 8 = 16 processes",
        "gradient accumulation steps: 8",
        "Parameters:",
        "FLOPs per token",
        "Memory per process on H100 (bf16, distributed optimizer",
        "tokens/s",
        "OK: the layout splits and fits",
        "structure: lowrank",
    ):
        assert fragment in out, fragment


def test_json_plan(capsys):
    status, out, _ = run_main(TINY, "--world-size", "2", "--device", "cpu", "--json", capsys=capsys)
    assert status == 0
    plan = json.loads(out)
    assert plan["layout"]["data_parallel"] == 2 and plan["precision"] == "fp32"
    stage = plan["stages"][0]
    assert stage["total"] == sum(stage[k] for k in ("weights", "gradients", "optimizer", "activations"))


REFUSALS = [
    # (config, arguments, fragments of the reason)
    (TINY, ["--world-size", "3", "parallel.tensor_parallel=2"], ["world size 3", "parallel.tensor_parallel=2"]),
    (
        TINY,
        ["--world-size", "2", "parallel.pipeline_parallel=3"],
        ["model.num_layers=4", "parallel.pipeline_parallel=3"],
    ),
    (
        CONFIGS / "paper" / "s_blockdense32.yaml",
        ["--world-size", "8", "parallel.tensor_parallel=4", "model.ffn.blocks=2", "model.ffn.rank=192"],
        ["blocks=2", "parallel.tensor_parallel=4"],
    ),
    (
        TINY,
        ["--world-size", "3", "training.global_batch_size=8", "training.micro_batch_size=4"],
        ["training.global_batch_size=8", "data-parallel size 3"],
    ),
    (TINY, ["--world-size", "2", "parallel.tensor_parallel=2", "model.vocab_size=8191"], ["model.vocab_size=8191"]),
    (
        TINY,
        ["sgt.enabled=true", "sgt.mode=same_flops", "sgt.guided_fraction=1.0", "sgt.stochastic=false"],
        ["sgt: ", "no same-FLOPs run exists"],
    ),
    (
        CONFIGS / "paper" / "xl_dense.yaml",
        ["--world-size", "8", "--device", "L4", "training.micro_batch_size=16"],
        ["memory:", "24.00 GiB of L4"],
    ),
    (TINY, ["--assume-mfu", "1.5"], ["--assume-mfu=1.5"]),
]


@pytest.mark.parametrize("path,args,fragments", REFUSALS, ids=[" ".join(r[1]) for r in REFUSALS])
def test_refuses_layouts_that_cannot_work(capsys, path, args, fragments):
    status, _, err = run_main(path, "--device", "cpu", *args, capsys=capsys)
    assert status == 2
    assert "error: refused:" in err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} missing from {err}"


# -- the estimate against a real run ----------------------------------------------------------------


def _live_tensor_tracker():
    """A dispatch mode that follows the bytes of every live tensor storage created by an ATen op."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class LiveTensorBytes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.live = 0
            self.peak = 0
            self.measuring = False
            self._sizes: dict[int, int] = {}

        def _freed(self, key: int) -> None:
            self.live -= self._sizes.pop(key, 0)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                    storage = t.untyped_storage()
                    key = storage.data_ptr()
                    if key and key not in self._sizes:
                        self._sizes[key] = storage.nbytes()
                        self.live += storage.nbytes()
                        weakref.finalize(storage, self._freed, key)
            if self.measuring:
                self.peak = max(self.peak, self.live)
            return out

    return LiveTensorBytes()


def measure_training_memory(config_path: str, overrides: list[str]) -> dict[str, int]:
    """Run the trainer in this process and report its peak live tensor bytes during training steps."""
    from megatron_sffn.training import loop

    cfg = load_config(TrainConfig, config_path, overrides)
    tracker = _live_tensor_tracker()
    after_step = []
    train_step = loop.train_step

    def measured_step(*args, **kwargs):
        tracker.measuring = True
        try:
            return train_step(*args, **kwargs)
        finally:
            tracker.measuring = False
            after_step.append(tracker.live)

    loop.train_step = measured_step
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with tracker:
        trainer = loop.Trainer(cfg)
        trainer.restore()
        trainer.run()
    return {
        "peak_live_bytes": tracker.peak,
        "live_after_last_step": after_step[-1],  # weights, gradient buffers and optimizer state
        "peak_rss_growth": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before,
    }


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("dry_run_data"), tiny_context_length())


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["softmax", "supra"])
def test_memory_estimate_of_tiny_is_within_25_percent_of_a_real_run(tiny_dataset, tmp_path, attention):
    overrides = [
        f"data.path={tiny_dataset.prepared}",
        f"data.tokenizer={tiny_dataset.tokenizer}",
        f"run_dir={tmp_path / 'run'}",
        "training.train_steps=2",
        "checkpoint.save_interval=null",
        "eval.interval=null",
        "eval.at_end=false",
        "logging.tensorboard=false",
        "logging.peak_tflops_per_device=1",
        f"model.attention={attention}",
    ]
    out = tmp_path / "measured.json"
    script = (
        "import json, sys\n"
        "from tests.test_dry_run import measure_training_memory\n"
        "json.dump(measure_training_memory(sys.argv[2], sys.argv[3:]), open(sys.argv[1], 'w'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(out), str(TINY), *overrides],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=MEASURE_TIMEOUT_S,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-6000:]
    measured = json.loads(out.read_text())

    plan = plan_run(config(TINY, *overrides), 1, device="cpu")
    stage = plan.peak_stage
    static = stage.weights + stage.gradients + stage.optimizer
    summary = (
        f"tiny ({attention}), 1 CPU process: estimated {stage.total / 2**20:.1f} MiB (static {static / 2**20:.1f}, activations "
        f"{stage.activations / 2**20:.1f}); measured peak live tensors {measured['peak_live_bytes'] / 2**20:.1f} MiB "
        f"(after a step {measured['live_after_last_step'] / 2**20:.1f}); peak RSS growth "
        f"{measured['peak_rss_growth'] / 2**20:.1f} MiB"
    )
    print(summary)
    assert stage.total == pytest.approx(measured["peak_live_bytes"], rel=MEMORY_TOLERANCE), summary
    assert static == pytest.approx(measured["live_after_last_step"], rel=0.05), summary
    activations_measured = measured["peak_live_bytes"] - measured["live_after_last_step"]
    assert stage.activations == pytest.approx(activations_measured, rel=MEMORY_TOLERANCE), summary
