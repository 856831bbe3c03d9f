"""What a run reports while it trains: TensorBoard scalars and one console line per log interval.

Model FLOPs utilisation (MFU) is the number researchers compare across
trainers, so its two inputs are pinned down here:

* the numerator is the model's training FLOPs per token by the structured
  formula of "Building on Efficient Foundations" (Wei et al., NeurIPS 2024)
  from :mod:`megatron_sffn.accounting.model`, never the dense ``6N``: a
  structured model would otherwise be credited with FLOPs it skips.  Under
  evolving subnetwork training each step counts its own subnetwork's FLOPs.
  Activation recomputation is not counted (MFU, not hardware utilisation);
* the denominator is one device's peak: the vendor's dense (no 2:4 sparsity)
  bf16 or fp32 figure for known GPUs (:data:`megatron_sffn.planning.devices.DEVICES`), or
  ``logging.peak_tflops_per_device``.  On CPU there is no meaningful
  datasheet figure, so the peak is measured once with a short fp32 matmul
  micro-benchmark: CPU "MFU" is relative to the matmul throughput this
  process actually achieves, not to a theoretical peak.

TensorBoard tags (x axis: optimizer step)

==================================== ===================================================
``train/lm_loss``                     mean LM loss of the interval's finite steps
``train/perplexity``                  exp(``train/lm_loss``)
``train/learning_rate``               learning rate of the interval's last step
``train/grad_norm``                   gradient norm (before clipping), last step
``train/params_norm``                 parameter norm, last step (when the loop gives it)
``train/consumed_tokens``             tokens drawn from the data stream so far
``train/skipped_steps``               steps skipped for a non-finite loss/gradient so far
``throughput/tokens_per_s``           all devices together, over the interval
``throughput/tokens_per_s_per_device``  the above over the world size
``throughput/tflops_per_device``      model training TFLOP/s per device
``throughput/mfu``                    fraction (0..1) of the device peak
``memory/peak_bytes``                 CUDA max allocated; peak RSS of the process on CPU
``memory/max_reserved_bytes``         GPU only: peak bytes the caching allocator reserved
``memory/max_active_bytes``           GPU only: peak bytes in live blocks
``memory/alloc_retries``              GPU only: allocations that had to free the cache and retry
``memory/ooms``                       GPU only: out-of-memory errors the allocator raised
``time/step_s``                       mean wall time of the interval's steps (evaluation and saves excluded)
``time/data_loading_s``               mean time per step spent waiting for the step's micro-batches
``time/data_loading_share``           the above over ``time/step_s``
``val/lm_loss``, ``val/perplexity``   validation loss and perplexity
``sgt/alpha``                         self-guided training: α of the step
``sgt/guide_use_rate``                fraction of the logging rank's guide draws that ran the dense branch
``est/stage``                         evolving subnetwork training: stage (1, 2, 3) of the step
``est/layers_fraction``               fraction of the layers the step's subnetwork kept
``est/heads_fraction``                mean fraction of a kept layer's attention heads kept
``est/hidden_fraction``               mean fraction of a kept layer's FFN hidden units kept
``est/flops_fraction``                the step's training FLOPs over the full model's
==================================== ===================================================

Only one rank writes (the last pipeline stage's first tensor/data-parallel
rank, where the loss lives); the others build a disabled logger.
"""

from __future__ import annotations

import contextlib
import functools
import math
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..accounting.model import training_flops_per_token
from ..config.model import ModelConfig
from ..config.train import TrainConfig
from ..planning.devices import PeakFlops, resolve_peak_flops
from ..planning.steps import resolved_train_steps

TENSORBOARD_SUBDIR = "tensorboard"
_GIB = 1024**3
_print_flushed = functools.partial(print, flush=True)  # the console line appears as each step ends


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this rank: CUDA max allocated, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def cuda_memory_scalars(device: torch.device) -> dict[str, float] | None:
    """The caching allocator's peaks and failure counters (``torch.cuda.memory_stats``); None off the GPU."""
    if device.type != "cuda":
        return None
    stats = torch.cuda.memory_stats(device)
    return {
        "memory/max_reserved_bytes": float(stats.get("reserved_bytes.all.peak", 0)),
        "memory/max_active_bytes": float(stats.get("active_bytes.all.peak", 0)),
        "memory/alloc_retries": float(stats.get("num_alloc_retries", 0)),
        "memory/ooms": float(stats.get("num_ooms", 0)),
    }


def format_step_time(seconds: float) -> str:
    """0.0123 -> '12.3 ms/step', 1.27 -> '1.27 s/step'."""
    return f"{seconds * 1e3:.3g} ms/step" if seconds < 1.0 else f"{seconds:.3g} s/step"


def format_count(value: float) -> str:
    """41234 -> '41.2k', 1.5e6 -> '1.5M': three significant figures, readable at a glance.

    Rounding comes first so that 999,999 reads '1M', not '1e+03k'.
    """
    rounded = float(f"{value:.3g}")
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(rounded) >= threshold:
            scaled = rounded / threshold
            return (f"{scaled:.3g}" if abs(scaled) < 1000 else f"{scaled:.0f}") + suffix
    return f"{rounded:g}"


def format_duration(seconds: float) -> str:
    """Compact remaining time: '45s', '12m05s', '1h02m', '3d04h'."""
    if not math.isfinite(seconds):
        return "?"
    total = max(0, round(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def perplexity(loss: float) -> float:
    """exp(loss), saturating to inf instead of raising for a diverged loss (NaN stays NaN)."""
    return math.inf if loss > 709.0 else math.exp(loss)


@dataclass(frozen=True)
class IntervalMetrics:
    """Everything reported for one log interval."""

    step: int
    train_steps: int
    lm_loss: float
    learning_rate: float
    grad_norm: float | None
    params_norm: float | None
    consumed_tokens: int
    skipped_steps: int
    tokens_per_s: float
    tokens_per_s_per_device: float
    tflops_per_device: float
    mfu: float | None
    peak_memory_bytes: int
    eta_seconds: float
    step_seconds: float | None = None
    data_seconds: float | None = None  # per step
    gpu_memory: dict[str, float] | None = None  # cuda_memory_scalars(), None on CPU

    def console_line(self) -> str:
        """``step 120/4196 | loss 3.412 | lr 5.9e-04 | grad 0.84 | 41.2k tok/s | 38.5% MFU | 12.3 GiB | 1.27 s/step
        | ETA 1h02m`` (one line)."""
        mfu = f"{100 * self.mfu:.1f}% MFU" if self.mfu is not None else "MFU n/a"
        parts = [
            f"step {self.step}/{self.train_steps}",
            f"loss {self.lm_loss:.3f}",
            f"lr {self.learning_rate:.1e}",
            f"grad {self.grad_norm:.3g}" if self.grad_norm is not None else "grad n/a",
            f"{format_count(self.tokens_per_s)} tok/s",
            mfu,
            f"{self.peak_memory_bytes / _GIB:.1f} GiB",
        ]
        if self.step_seconds is not None:
            parts.append(format_step_time(self.step_seconds))
        parts.append(f"ETA {format_duration(self.eta_seconds)}")
        if self.skipped_steps:
            parts.append(f"skipped {self.skipped_steps}")
        return " | ".join(parts)

    def scalars(self) -> dict[str, float]:
        values = {
            "train/lm_loss": self.lm_loss,
            "train/perplexity": perplexity(self.lm_loss),
            "train/learning_rate": self.learning_rate,
            "train/grad_norm": self.grad_norm,
            "train/params_norm": self.params_norm,
            "train/consumed_tokens": self.consumed_tokens,
            "train/skipped_steps": self.skipped_steps,
            "throughput/tokens_per_s": self.tokens_per_s,
            "throughput/tokens_per_s_per_device": self.tokens_per_s_per_device,
            "throughput/tflops_per_device": self.tflops_per_device,
            "throughput/mfu": self.mfu,
            "memory/peak_bytes": self.peak_memory_bytes,
            "time/step_s": self.step_seconds,
            "time/data_loading_s": self.data_seconds,
            "time/data_loading_share": (
                self.data_seconds / self.step_seconds if self.data_seconds is not None and self.step_seconds else None
            ),
            **(self.gpu_memory or {}),
        }
        return {tag: float(v) for tag, v in values.items() if v is not None}


class MetricsLogger:
    """Accumulates per-step values and reports every ``log_interval`` steps (and at the last step).

    Throughput is measured between reports, so :meth:`start` must be called
    once training begins (after a resume too) and time spent outside training
    steps (evaluation, checkpoint saves) should run inside :meth:`excluded`.
    A disabled logger (every rank but the reporting one) does nothing.
    """

    def __init__(
        self,
        *,
        model: ModelConfig,
        train_steps: int,
        world_size: int,
        log_interval: int,
        device: torch.device,
        peak: PeakFlops | None,
        tensorboard_dir: str | Path | None,
        enabled: bool = True,
        clock: Callable[[], float] = time.perf_counter,
        print_fn: Callable[[str], None] = _print_flushed,
    ) -> None:
        if world_size <= 0 or log_interval <= 0 or train_steps <= 0:
            raise ValueError(
                f"world_size={world_size}, log_interval={log_interval}, train_steps={train_steps} must be positive"
            )
        self.enabled = enabled
        self.train_steps = train_steps
        self.world_size = world_size
        self.log_interval = log_interval
        self.device = device
        self.peak = peak
        self.flops_per_token = training_flops_per_token(model)
        self._tensorboard_dir = Path(tensorboard_dir) if tensorboard_dir is not None else None
        self._clock = clock
        self._print = print_fn
        self._writer = None
        self._started = False
        self._excluded_seconds = 0.0
        self._reset_interval()

    @classmethod
    def from_config(cls, cfg: TrainConfig, *, world_size: int, device: torch.device, enabled: bool) -> MetricsLogger:
        """The logger of a run; measures the CPU peak (a fraction of a second) only on the reporting rank."""
        on_gpu = device.type == "cuda"
        peak = None
        if enabled:
            precision = cfg.training.resolved_precision(on_gpu)
            peak = resolve_peak_flops(device, precision, cfg.logging.peak_tflops_per_device)
        return cls(
            model=cfg.model,
            train_steps=resolved_train_steps(cfg),
            world_size=world_size,
            log_interval=cfg.logging.log_interval,
            device=device,
            peak=peak,
            tensorboard_dir=Path(cfg.run_dir) / TENSORBOARD_SUBDIR if cfg.logging.tensorboard else None,
            enabled=enabled,
        )

    def _reset_interval(self) -> None:
        self._loss_sum = 0.0
        self._loss_count = 0
        self._steps_in_interval = 0
        self._data_seconds = 0.0
        self._interval_flops = 0.0

    def start(self, step: int, consumed_tokens: int) -> None:
        """Open the first throughput window at ``step`` (0, or the resumed step).

        On a resume, TensorBoard events the previous launch wrote after
        ``step`` (steps it trained but never checkpointed) are purged, so the
        curves show the trajectory that was actually kept.
        """
        if not self.enabled:
            return
        self._window_step = step
        self._window_tokens = self._last_tokens = consumed_tokens
        self._window_start = self._clock()
        self._excluded_seconds = 0.0
        self._reset_interval()
        self._started = True
        if self._tensorboard_dir is not None and self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # pulls in tensorboard: only the writing rank pays

            self._writer = SummaryWriter(str(self._tensorboard_dir), purge_step=step + 1 if step > 0 else None)
        where = f"TensorBoard events in {self._tensorboard_dir}" if self._writer is not None else "TensorBoard off"
        if self.peak is None:
            mfu = "MFU n/a (unknown device peak: set logging.peak_tflops_per_device)"
        else:
            mfu = f"MFU against {self.peak.flops_per_second / 1e12:.4g} TFLOP/s per device ({self.peak.source})"
        self._print(f"metrics: {where}; {mfu}; {self.flops_per_token / 1e6:.4g} MFLOP per token trained")

    @contextlib.contextmanager
    def excluded(self) -> Iterator[None]:
        """Time spent inside does not count against throughput (evaluation, checkpointing)."""
        t0 = self._clock()
        try:
            yield
        finally:
            self._excluded_seconds += self._clock() - t0

    def train_step(
        self,
        step: int,
        *,
        loss: float,
        learning_rate: float,
        consumed_tokens: int,
        skipped_steps: int,
        grad_norm: float | None = None,
        params_norm: float | None = None,
        data_seconds: float = 0.0,
        extra_scalars: dict[str, float] | None = None,
        flops_per_token: float | None = None,
    ) -> IntervalMetrics | None:
        """Record finished step ``step`` (1-based); report and return the interval's metrics when one ends.

        Losses of skipped (non-finite) steps are left out of the mean; the
        skipped count is reported instead.  ``extra_scalars`` (e.g.
        self-guided training's ``sgt/alpha``) are written as they are at the
        reporting step.  ``data_seconds`` is the time the step waited for its
        micro-batches.  ``flops_per_token``: this step's training FLOPs per
        token when they differ from the model's (evolving subnetwork
        training's sampled subnetwork); throughput and MFU sum each step's own.
        """
        if not self.enabled:
            return None
        if not self._started:
            raise RuntimeError("MetricsLogger.start() must be called before the first train_step()")
        if math.isfinite(loss):
            self._loss_sum += loss
            self._loss_count += 1
        self._steps_in_interval += 1
        self._data_seconds += data_seconds
        step_tokens = consumed_tokens - self._last_tokens
        self._last_tokens = consumed_tokens
        self._interval_flops += step_tokens * (self.flops_per_token if flops_per_token is None else flops_per_token)
        if step % self.log_interval and step != self.train_steps:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the window must end when the device's work does
        now = self._clock()
        seconds = max(now - self._window_start - self._excluded_seconds, 1e-9)
        steps = step - self._window_step
        tokens_per_s = (consumed_tokens - self._window_tokens) / seconds
        per_device = tokens_per_s / self.world_size
        flops_per_device = self._interval_flops / seconds / self.world_size
        metrics = IntervalMetrics(
            step=step,
            train_steps=self.train_steps,
            lm_loss=self._loss_sum / self._loss_count if self._loss_count else math.nan,
            learning_rate=learning_rate,
            grad_norm=grad_norm,
            params_norm=params_norm,
            consumed_tokens=consumed_tokens,
            skipped_steps=skipped_steps,
            tokens_per_s=tokens_per_s,
            tokens_per_s_per_device=per_device,
            tflops_per_device=flops_per_device / 1e12,
            mfu=flops_per_device / self.peak.flops_per_second if self.peak is not None else None,
            peak_memory_bytes=peak_memory_bytes(self.device),
            eta_seconds=(self.train_steps - step) * seconds / steps if steps > 0 else math.inf,
            step_seconds=seconds / steps if steps > 0 else None,
            data_seconds=self._data_seconds / self._steps_in_interval,
            gpu_memory=cuda_memory_scalars(self.device),
        )
        self._write({**metrics.scalars(), **(extra_scalars or {})}, step)
        self._print(metrics.console_line())
        self._window_step, self._window_tokens, self._window_start = step, consumed_tokens, now
        self._excluded_seconds = 0.0
        self._reset_interval()
        return metrics

    def validation(self, step: int, loss: float) -> str | None:
        """Report a validation loss (mean token cross-entropy over the evaluated split)."""
        if not self.enabled:
            return None
        ppl = perplexity(loss)
        self._write({"val/lm_loss": loss, "val/perplexity": ppl}, step)
        line = f"validation at step {step} | loss {loss:.4f} | perplexity {ppl:.2f}"
        self._print(line)
        return line

    def _write(self, scalars: dict[str, float], step: int) -> None:
        if self._writer is None:
            return
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, step)
        self._writer.flush()  # a pre-empted job keeps everything it reported

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
