"""Which structured linears run on their pre-merged dense shard, and from how many tokens on they do not.

``off``: factors only, nothing extra in memory.  ``on``: every structured
linear holds its merged shard and always uses it.  ``auto``: it holds it and
uses it for calls of at most a *measured* number of tokens.

The threshold of ``auto`` is calibrated per distinct linear (structure,
role, sizes, TP layout, dtype) on the device the model runs on: the layer's
own forward is timed with the factors and with the merged matrix at 1, 2, 4,
... tokens (collectives included, all TP ranks in step) until the factors
win at two sizes in a row; the threshold is the largest size below that at
which the merged matrix was at least as fast.  Rank 0's verdict at every
size is broadcast, so all ranks measure the same sizes and take the same
branch.  Results are cached in a
JSON table keyed by device and shape (``$SFFN_CACHE_DIR`` or
``~/.cache/megatron-sffn``, file ``premerge_thresholds.json``), so a shape
is calibrated once per machine (delete the file to measure again, e.g. on a
machine that became busier or idler).  ``benchmarks/decode_bench.py``
measures the same crossover at the level of the FFN and the model step.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from ..atomic_io import write_text_atomic

if TYPE_CHECKING:
    from ..parallel.base import TPStructuredLinear

PreMergeMode = Literal["auto", "on", "off"]
PRE_MERGE_MODES = ("auto", "on", "off")
CACHE_FILE = "premerge_thresholds.json"
CALIBRATION_MAX_TOKENS = 4096


@dataclass
class PreMergeReport:
    """What pre-merge added: bytes of merged shards on this rank and the threshold of each linear kind."""

    mode: str
    extra_bytes: int = 0
    thresholds: dict[str, int] = field(default_factory=dict)  # shape key -> largest token count on the merged shard
    calibrated: list[str] = field(default_factory=list)  # keys measured now (not from the cache)
    calibration_seconds: float = 0.0


def structured_linears(model: torch.nn.Module) -> list[TPStructuredLinear]:
    from ..parallel.base import TPStructuredLinear

    return [m for m in model.modules() if isinstance(m, TPStructuredLinear)]


def apply_pre_merge(
    model: torch.nn.Module,
    mode: PreMergeMode,
    *,
    cache_dir: Path | None = None,
    calibration_max_tokens: int = CALIBRATION_MAX_TOKENS,
) -> PreMergeReport:
    """Set up pre-merge on every structured linear of ``model``; collective over the TP group.

    ``calibration_max_tokens`` bounds ``auto``'s measurement (calls above it
    use the factors unless the merged shard won at every size measured).
    """
    from ..parallel.premerge import ALWAYS

    if mode not in PRE_MERGE_MODES:
        raise ValueError(f"pre_merge={mode!r}; expected one of {PRE_MERGE_MODES}")
    report = PreMergeReport(mode)
    layers = structured_linears(model)
    for layer in layers:
        layer.drop_merged()
    if mode == "off" or not layers:
        return report
    for layer in layers:
        report.extra_bytes += layer.attach_merged(ALWAYS)
    if mode == "on":
        report.thresholds = {shape_key(layer): ALWAYS for layer in layers}
        return report
    cache = ThresholdCache(cache_dir)
    for layer in layers:
        key = shape_key(layer)
        if key not in report.thresholds:
            cached = cache.get(key)
            threshold = _agree(-1 if cached is None else cached)  # ranks' caches may differ; rank 0 decides
            if threshold < 0:
                started = time.perf_counter()
                threshold = calibrate(layer, max_tokens=calibration_max_tokens)
                report.calibration_seconds += time.perf_counter() - started
                cache.put(key, threshold)
                report.calibrated.append(key)
            report.thresholds[key] = threshold
        layer.merge_threshold = report.thresholds[key]
    return report


def shape_key(layer: TPStructuredLinear) -> str:
    """Everything a linear's timing depends on: device, structure, sizes, TP layout, dtype."""
    factor = getattr(layer, next(iter(layer._factors)))
    sizes = f"r{layer.shape.rank}" if layer.shape.rank else ""
    sizes += f"b{layer.shape.blocks}" if layer.shape.blocks else ""
    return (
        f"{device_name(factor.device)}|{layer.kind}.{layer.role}|{layer.input_size}x{layer.output_size}{sizes}|"
        f"tp{layer.layout.size}:{layer.strategy}|{str(factor.dtype).removeprefix('torch.')}"
    )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu:{platform.machine()}:{torch.get_num_threads()}threads"


@torch.no_grad()
def calibrate(layer: TPStructuredLinear, *, max_tokens: int = CALIBRATION_MAX_TOKENS, repeats: int = 5) -> int:
    """Largest token count at which the merged shard is at least as fast as the factors (see module doc)."""
    from ..parallel.premerge import ALWAYS, NEVER

    merged, threshold, factors_won = layer.merged, NEVER, 0
    tokens = 1
    while tokens <= max_tokens:
        x = torch.randn(tokens, layer.input_size // _input_split(layer), dtype=merged.dtype, device=merged.device)
        timings = {ALWAYS: [], NEVER: []}
        for round_index in range(repeats + 1):  # round 0 warms up
            for setting in (ALWAYS, NEVER):
                layer.merge_threshold = setting
                seconds = _time(functools.partial(layer, x), merged.device)
                if round_index:
                    timings[setting].append(seconds)
        merged_won = statistics.median(timings[ALWAYS]) <= statistics.median(timings[NEVER])
        if _agree(int(merged_won)):  # every rank must stop at the same size: the loop runs collectives
            threshold, factors_won = tokens, 0
        else:
            factors_won += 1
            if factors_won == 2:
                break
        tokens *= 2
    if factors_won == 0:
        threshold = ALWAYS  # the merged shard was still at least as fast at the largest size measured
    layer.merge_threshold = threshold
    return threshold


def _input_split(layer: TPStructuredLinear) -> int:
    """fc2 takes this rank's hidden units; fc1 the full input."""
    return layer.layout.size if layer.role == "fc2" else 1


def _time(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _agree(value: int) -> int:
    """Rank 0's ``value`` on every rank of the world (ranks' timings differ; their branches must not)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None  # NCCL
    tensor = torch.tensor([value], dtype=torch.long, device=device)
    dist.broadcast(tensor, 0)
    return int(tensor)


class ThresholdCache:
    """The JSON table of calibrated thresholds; read by every rank, written by global rank 0."""

    def __init__(self, directory: Path | None = None) -> None:
        root = directory or Path(os.environ.get("SFFN_CACHE_DIR") or Path.home() / ".cache" / "megatron-sffn")
        self.path = Path(root) / CACHE_FILE
        self._table = self._read()

    def _read(self) -> dict[str, int]:
        if not self.path.exists():
            return {}
        try:
            table = json.loads(self.path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{self.path}: not a JSON table of pre-merge thresholds ({exc}); delete it") from exc
        if not isinstance(table, dict) or not all(isinstance(v, int) for v in table.values()):
            raise ValueError(f"{self.path}: expected an object of shape key -> token count; delete it")
        return table

    def get(self, key: str) -> int | None:
        return self._table.get(key)

    def put(self, key: str, threshold: int) -> None:
        import torch.distributed as dist

        self._table[key] = threshold
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps(self._table, indent=2, sort_keys=True) + "\n")
