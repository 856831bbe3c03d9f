"""Metrics: TensorBoard events read back with TensorBoard's own reader, the console line, and MFU by hand."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_sffn.config.loading import from_dict
from megatron_sffn.config.model import ModelConfig
from megatron_sffn.config.train import TrainConfig
from megatron_sffn.planning.devices import PeakFlops, lookup_gpu_peak, measure_cpu_matmul_peak, resolve_peak_flops
from megatron_sffn.training.metrics import (
    IntervalMetrics,
    MetricsLogger,
    format_count,
    format_duration,
    peak_memory_bytes,
    perplexity,
)

# d 64, 2 layers, 4 heads of 16, context 32, vocab 128; layer 1's FFN LowRank R=16, layer 0 dense.
MODEL = {
    "hidden_size": 64,
    "num_layers": 2,
    "num_attention_heads": 4,
    "seq_length": 32,
    "vocab_size": 128,
    "ffn": {"structure": "lowrank", "rank": 16},
}
# The paper's formula written out by hand for MODEL:
#   attention 2·L·(2·d_attn·d + 2·d_kv·d + 2·seq·d_attn) = 2·2·(8192 + 8192 + 4096) = 81920
#   FFN 2·(dense 2·64·256 + LowRank 2·(64 + 256)·16)     = 2·(32768 + 10240)        = 86016
#   logits 2·V·d                                          = 2·128·64                 = 16384
# forward 184320 FLOPs per token; training = 3 × forward.
HAND_TRAINING_FLOPS_PER_TOKEN = 3 * (81920 + 86016 + 16384)
TOKENS_PER_STEP = 256
TAGS = {
    "train/lm_loss",
    "train/perplexity",
    "train/learning_rate",
    "train/grad_norm",
    "train/params_norm",
    "train/consumed_tokens",
    "train/skipped_steps",
    "throughput/tokens_per_s",
    "throughput/tokens_per_s_per_device",
    "throughput/tflops_per_device",
    "throughput/mfu",
    "memory/peak_bytes",
    "time/step_s",
    "time/data_loading_s",
    "time/data_loading_share",
}
GPU_MEMORY_TAGS = {"memory/max_reserved_bytes", "memory/max_active_bytes", "memory/alloc_retries", "memory/ooms"}


class FakeClock:
    """Time that moves only when the test says so: throughput becomes exact arithmetic."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_logger(tmp_path, clock, *, peak=PeakFlops(0.5e9, "test"), world_size=2, enabled=True, lines=None, **kw):
    return MetricsLogger(
        model=ModelConfig(**MODEL),
        train_steps=kw.pop("train_steps", 20),
        world_size=world_size,
        log_interval=kw.pop("log_interval", 10),
        device=kw.pop("device", torch.device("cpu")),
        peak=peak,
        tensorboard_dir=tmp_path / "tb",
        enabled=enabled,
        clock=clock,
        print_fn=(lines.append if lines is not None else lambda line: None),
        **kw,
    )


def run_steps(
    logger, clock, steps, *, first=1, seconds_per_step=0.4, loss=lambda s: 5.0 - 0.1 * s, skipped=(), data_seconds=0.1
):
    reports = []
    for step in range(first, first + steps):
        clock.now += seconds_per_step
        report = logger.train_step(
            step,
            loss=math.nan if step in skipped else loss(step),
            learning_rate=1e-3 * step,
            consumed_tokens=step * TOKENS_PER_STEP,
            skipped_steps=sum(1 for s in skipped if s <= step),
            grad_norm=0.5 + step,
            params_norm=100.0 + step,
            data_seconds=data_seconds,
        )
        if report is not None:
            reports.append(report)
    return reports


def read_events(directory) -> EventAccumulator:
    acc = EventAccumulator(str(directory))
    acc.Reload()
    return acc


def test_mfu_matches_a_hand_computation(tmp_path):
    clock = FakeClock()
    logger = make_logger(tmp_path, clock)
    assert logger.flops_per_token == HAND_TRAINING_FLOPS_PER_TOKEN
    logger.start(step=0, consumed_tokens=0)
    first, _ = run_steps(logger, clock, 20)
    # 10 steps x 256 tokens in 10 x 0.4 s = 640 tokens/s over 2 devices = 320 per device.
    assert first.tokens_per_s == pytest.approx(640.0)
    assert first.tokens_per_s_per_device == pytest.approx(320.0)
    assert first.tflops_per_device == pytest.approx(320.0 * 552960 / 1e12)
    assert first.mfu == pytest.approx(320.0 * 552960 / 0.5e9)  # 0.3538944
    assert first.eta_seconds == pytest.approx(10 * 0.4)
    assert " | 35.4% MFU | " in first.console_line()
    logger.close()


def test_tensorboard_events_read_back(tmp_path):
    clock = FakeClock()
    lines = []
    logger = make_logger(tmp_path, clock, lines=lines)
    logger.start(step=0, consumed_tokens=0)
    reports = run_steps(logger, clock, 20, skipped={13})
    logger.validation(20, 2.5)
    logger.close()
    assert [r.step for r in reports] == [10, 20]

    acc = read_events(tmp_path / "tb")
    assert set(acc.Tags()["scalars"]) == TAGS | {"val/lm_loss", "val/perplexity"}
    scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    assert set(scalars["train/lm_loss"]) == {10, 20}
    # Steps 1..10 mean loss = 5 - 0.1 x 5.5; steps 11..20 without the skipped step 13.
    assert scalars["train/lm_loss"][10] == pytest.approx(4.45, rel=1e-6)
    second = [5.0 - 0.1 * s for s in range(11, 21) if s != 13]
    assert scalars["train/lm_loss"][20] == pytest.approx(sum(second) / len(second), rel=1e-6)
    assert scalars["train/perplexity"][10] == pytest.approx(math.exp(4.45), rel=1e-6)
    assert scalars["train/learning_rate"][20] == pytest.approx(0.02)
    assert scalars["train/grad_norm"][10] == pytest.approx(10.5)
    assert scalars["train/params_norm"][20] == pytest.approx(120.0)
    assert scalars["train/consumed_tokens"] == {10: 2560.0, 20: 5120.0}
    assert scalars["train/skipped_steps"] == {10: 0.0, 20: 1.0}
    assert scalars["throughput/tokens_per_s"][20] == pytest.approx(640.0)
    assert scalars["throughput/tokens_per_s_per_device"][20] == pytest.approx(320.0)
    assert scalars["throughput/mfu"][20] == pytest.approx(0.3538944, rel=1e-6)
    assert scalars["memory/peak_bytes"][20] > 0
    assert scalars["time/step_s"][20] == pytest.approx(0.4)
    assert scalars["time/data_loading_s"][20] == pytest.approx(0.1)
    assert scalars["time/data_loading_share"][20] == pytest.approx(0.25)
    assert "| grad 20.5 | " in lines[-2] and "| 400 ms/step | " in lines[-2]
    assert scalars["val/lm_loss"] == {20: 2.5}
    assert scalars["val/perplexity"][20] == pytest.approx(math.exp(2.5), rel=1e-6)
    assert lines[0].startswith("metrics: TensorBoard events in ")
    assert lines[-2].endswith("| skipped 1")
    assert lines[-1] == "validation at step 20 | loss 2.5000 | perplexity 12.18"


def test_resume_hides_the_lost_steps(tmp_path):
    clock = FakeClock()
    first = make_logger(tmp_path, clock)
    first.start(step=0, consumed_tokens=0)
    run_steps(first, clock, 20, loss=lambda s: 7.0)  # steps 11..20 are lost: the checkpoint was at step 10
    first.close()
    resumed = make_logger(tmp_path, clock)
    resumed.start(step=10, consumed_tokens=10 * TOKENS_PER_STEP)
    run_steps(resumed, clock, 10, first=11, loss=lambda s: 3.0)
    resumed.close()
    losses = [(e.step, e.value) for e in read_events(tmp_path / "tb").Scalars("train/lm_loss")]
    assert losses == [(10, 7.0), (20, 3.0)]


def test_excluded_time_is_not_throughput_time(tmp_path):
    clock = FakeClock()
    logger = make_logger(tmp_path, clock)
    logger.start(step=0, consumed_tokens=0)
    run_steps(logger, clock, 5)
    with logger.excluded():
        clock.now += 100.0  # an evaluation
    (report,) = run_steps(logger, clock, 5, first=6)
    assert report.tokens_per_s == pytest.approx(640.0)
    logger.close()


def test_unknown_peak_reports_mfu_as_unavailable(tmp_path):
    clock = FakeClock()
    lines = []
    logger = make_logger(tmp_path, clock, peak=None, lines=lines)
    logger.start(step=0, consumed_tokens=0)
    (report,) = run_steps(logger, clock, 10, seconds_per_step=0.1)
    logger.close()
    assert report.mfu is None and "throughput/mfu" not in report.scalars()
    assert "MFU n/a (unknown device peak: set logging.peak_tflops_per_device)" in lines[0]
    assert " | MFU n/a | " in lines[-1]


def test_disabled_logger_writes_nothing(tmp_path):
    clock = FakeClock()
    lines = []
    logger = make_logger(tmp_path, clock, enabled=False, lines=lines)
    logger.start(step=0, consumed_tokens=0)
    assert run_steps(logger, clock, 20) == []
    assert logger.validation(20, 1.0) is None
    logger.close()
    assert lines == [] and not (tmp_path / "tb").exists()


def test_train_step_before_start_is_an_error(tmp_path):
    logger = make_logger(tmp_path, FakeClock())
    with pytest.raises(RuntimeError, match="start\\(\\) must be called"):
        logger.train_step(1, loss=1.0, learning_rate=1.0, consumed_tokens=1, skipped_steps=0)


def test_console_line_format():
    metrics = IntervalMetrics(
        step=120,
        train_steps=4196,
        lm_loss=3.4121,
        learning_rate=5.94e-4,
        grad_norm=0.3,
        params_norm=None,
        consumed_tokens=120 * 524288,
        skipped_steps=0,
        tokens_per_s=41234.0,
        tokens_per_s_per_device=41234.0,
        tflops_per_device=1.0,
        mfu=0.3849,
        peak_memory_bytes=int(12.3 * 1024**3),
        eta_seconds=3725.0,
    )
    assert metrics.console_line() == (
        "step 120/4196 | loss 3.412 | lr 5.9e-04 | grad 0.3 | 41.2k tok/s | 38.5% MFU | 12.3 GiB | ETA 1h02m"
    )
    timed = dataclasses.replace(metrics, grad_norm=None, step_seconds=1.2712)
    assert timed.console_line() == (
        "step 120/4196 | loss 3.412 | lr 5.9e-04 | grad n/a | 41.2k tok/s | 38.5% MFU | 12.3 GiB | 1.27 s/step | ETA 1h02m"
    )
    pattern = (
        r"step \d+/\d+ \| loss \d+\.\d{3} \| lr \d\.\de[-+]\d\d \| grad \S+ \| [\d.]+[kMG]? tok/s \| "
        r"\d+\.\d% MFU \| \d+\.\d GiB \| [\d.]+ m?s/step \| ETA \S+"
    )
    assert re.fullmatch(pattern, timed.console_line())


def test_gpu_allocator_statistics_are_logged_from_memory_stats(tmp_path, monkeypatch):
    """The GPU path, on any machine: torch.cuda's statistics calls answer with known values."""
    stats = {
        "reserved_bytes.all.peak": 7 * 1024**3,
        "active_bytes.all.peak": 5 * 1024**3,
        "num_alloc_retries": 3,
        "num_ooms": 1,
    }
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device=None: stats)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 4 * 1024**3)
    clock = FakeClock()
    logger = make_logger(tmp_path, clock, device=torch.device("cuda", 0))
    logger.start(step=0, consumed_tokens=0)
    run_steps(logger, clock, 10)
    logger.close()
    scalars = {tag: {e.step: e.value for e in read_events(tmp_path / "tb").Scalars(tag)} for tag in GPU_MEMORY_TAGS}
    assert scalars == {
        "memory/max_reserved_bytes": {10: 7 * 1024**3},
        "memory/max_active_bytes": {10: 5 * 1024**3},
        "memory/alloc_retries": {10: 3.0},
        "memory/ooms": {10: 1.0},
    }


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_allocator_statistics_on_a_real_gpu():
    from megatron_sffn.training.metrics import cuda_memory_scalars

    device = torch.device("cuda", torch.cuda.current_device())
    block = torch.empty(64 * 1024**2, dtype=torch.uint8, device=device)
    found = cuda_memory_scalars(device)
    assert found["memory/max_active_bytes"] >= block.numel() and found["memory/max_reserved_bytes"] >= block.numel()
    assert cuda_memory_scalars(torch.device("cpu")) is None


@pytest.mark.parametrize(
    "value, text",
    [
        (950, "950"),
        (41234, "41.2k"),
        (999_499, "999k"),
        (999_999, "1M"),
        (1_500_000, "1.5M"),
        (2.5e9, "2.5G"),
        (2.5e12, "2500G"),
        (0.5, "0.5"),
    ],
)
def test_format_count(value, text):
    assert format_count(value) == text


@pytest.mark.parametrize(
    "seconds, text",
    [(45, "45s"), (725, "12m05s"), (3725, "1h02m"), (3 * 86400 + 4 * 3600 + 59, "3d04h"), (math.inf, "?")],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    "name, precision, tflops",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.5),
        ("NVIDIA H100 PCIe", "bf16", 756.5),
        ("NVIDIA H100 NVL", "fp32", 60.0),
        ("NVIDIA H200", "bf16", 989.5),
        ("NVIDIA H200 NVL", "bf16", 835.5),
        ("NVIDIA GH200 480GB", "bf16", 989.5),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("NVIDIA A100 80GB PCIe", "fp32", 19.5),
        ("NVIDIA L40S", "bf16", 362.05),
        ("NVIDIA L40", "bf16", 181.05),
        ("NVIDIA L4", "fp32", 30.3),
        ("NVIDIA A10", "bf16", 125.0),
        ("NVIDIA A40", "bf16", 149.7),
        ("NVIDIA GeForce RTX 4090", "bf16", 165.2),
        ("AMD Instinct MI300X", "bf16", 1307.4),
    ],
)
def test_gpu_peak_lookup(name, precision, tflops):
    peak = lookup_gpu_peak(name, precision)
    assert peak is not None and peak.flops_per_second == pytest.approx(tflops * 1e12)
    assert precision in peak.source


def test_gpu_peak_lookup_refuses_what_it_cannot_know():
    assert lookup_gpu_peak("Tesla T4", "bf16") is None
    assert lookup_gpu_peak("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "bf16") is None
    with pytest.raises(ValueError, match="precision='fp16'"):
        lookup_gpu_peak("NVIDIA H100 80GB HBM3", "fp16")


def test_perplexity_saturates():
    assert perplexity(2.0) == pytest.approx(math.exp(2.0))
    assert perplexity(1000.0) == math.inf
    assert math.isnan(perplexity(math.nan))


def test_cpu_peak_and_memory():
    measured = measure_cpu_matmul_peak(size=128, min_seconds=0.01)
    assert math.isfinite(measured) and measured > 0
    cpu = torch.device("cpu")
    assert resolve_peak_flops(cpu, "fp32", override_tflops=2.0) == PeakFlops(2e12, "logging.peak_tflops_per_device")
    assert "measured fp32 matmul" in resolve_peak_flops(cpu, "fp32").source
    assert resolve_peak_flops(torch.device("meta"), "fp32") is None
    torch.empty(64 * 1024**2, dtype=torch.uint8).fill_(1)  # touch 64 MiB: the peak resident set must see it
    assert peak_memory_bytes(cpu) > 64 * 1024**2


def test_from_config(tmp_path):
    data = {
        "run_dir": str(tmp_path / "run"),
        "model": MODEL,
        "data": {"path": "data/prepared"},
        "training": {"micro_batch_size": 2, "global_batch_size": 8, "train_tokens": 256 * 30 + 5},
        "logging": {"log_interval": 5, "peak_tflops_per_device": 3.0},
    }
    cfg = from_dict(TrainConfig, data)
    logger = MetricsLogger.from_config(cfg, world_size=4, device=torch.device("cpu"), enabled=True)
    assert (logger.train_steps, logger.world_size, logger.log_interval) == (30, 4, 5)
    assert logger.peak == PeakFlops(3e12, "logging.peak_tflops_per_device")
    logger.start(step=0, consumed_tokens=0)
    logger.close()
    assert any((tmp_path / "run" / "tensorboard").iterdir())
    quiet = from_dict(TrainConfig, {**data, "logging": {"tensorboard": False}})
    silent = MetricsLogger.from_config(quiet, world_size=1, device=torch.device("cpu"), enabled=False)
    assert silent.peak is None  # the CPU peak is measured on the reporting rank only
