"""The accelerators the project knows by name: dense peak FLOP/s and memory, each from the vendor's datasheet.

One table serves the trainer's MFU denominator
(:mod:`megatron_sffn.training.metrics`, through :func:`resolve_peak_flops`)
and the dry run's memory and speed plan (:func:`resolve_device`).  A name is matched as a whole word
(``H1000`` is not an ``H100``), more specific entries first (``H100 NVL``
before ``H100``).  Peaks are dense: where a datasheet prints only the 2:4
sparsity figure, half of it is used.  fp32 is the non-tensor-core peak, what
PyTorch runs fp32 matmuls at unless TF32 is switched on.  Memory is the size
as sold, in GiB.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_GIB = 1024**3


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator model; ``pattern`` is searched in ``torch.cuda.get_device_name()`` or ``--device``."""

    pattern: str
    name: str  # the short name users pass as --device
    label: str  # full name and the figures' source, printed beside every figure taken from here
    bf16_tflops: float
    fp32_tflops: float
    memory_gib: float


DEVICES: tuple[DeviceSpec, ...] = (
    # NVIDIA Blackwell, per GPU: HGX B200 datasheet (8 GPUs: bf16 36 PF sparse, fp32 600 TF, 1,440 GB);
    # GB200 NVL72 datasheet (72 GPUs: bf16 360 PF sparse, fp32 5,760 TF, 13.4 TB HBM3e).
    DeviceSpec(r"\bGB200\b", "GB200", "NVIDIA GB200 (GB200 NVL72 datasheet, per GPU)", 2500.0, 80.0, 186.0),
    DeviceSpec(r"\bB200\b", "B200", "NVIDIA B200 (HGX B200 datasheet, per GPU)", 2250.0, 75.0, 180.0),
    # NVIDIA Hopper: H100 and H200 datasheets (SXM, PCIe and NVL form factors), GH200 datasheet (96 GB HBM3).
    DeviceSpec(r"\bGH200\b", "GH200", "NVIDIA GH200 (GH200 datasheet)", 989.5, 67.0, 96.0),
    DeviceSpec(r"\bH100\b.*\bNVL\b", "H100 NVL", "NVIDIA H100 NVL (H100 datasheet)", 835.5, 60.0, 94.0),
    DeviceSpec(r"\bH100\b.*\bPCIe\b", "H100 PCIe", "NVIDIA H100 PCIe (H100 datasheet)", 756.5, 51.0, 80.0),
    DeviceSpec(r"\bH100\b", "H100", "NVIDIA H100 SXM (H100 datasheet)", 989.5, 67.0, 80.0),
    DeviceSpec(r"\bH200\b.*\bNVL\b", "H200 NVL", "NVIDIA H200 NVL (H200 datasheet)", 835.5, 60.0, 141.0),
    DeviceSpec(r"\bH200\b", "H200", "NVIDIA H200 SXM (H200 datasheet)", 989.5, 67.0, 141.0),
    # NVIDIA Ampere: A100 datasheet (40 GB and 80 GB models), A10 and A40 datasheets.
    DeviceSpec(r"\bA100\b.*\b40\s?GB\b", "A100 40GB", "NVIDIA A100 40GB (A100 datasheet)", 312.0, 19.5, 40.0),
    DeviceSpec(r"\bA100\b", "A100", "NVIDIA A100 (A100 datasheet)", 312.0, 19.5, 80.0),
    DeviceSpec(r"\bA10\b", "A10", "NVIDIA A10 (A10 datasheet)", 125.0, 31.2, 24.0),
    DeviceSpec(r"\bA40\b", "A40", "NVIDIA A40 (A40 datasheet)", 149.7, 37.4, 48.0),
    # NVIDIA Ada: L40S, L40 and L4 datasheets; RTX 4090 from the Ada Lovelace architecture whitepaper.
    DeviceSpec(r"\bL40S\b", "L40S", "NVIDIA L40S (L40S datasheet)", 362.05, 91.6, 48.0),
    DeviceSpec(r"\bL40\b", "L40", "NVIDIA L40 (L40 datasheet)", 181.05, 90.5, 48.0),
    DeviceSpec(r"\bL4\b", "L4", "NVIDIA L4 (L4 datasheet)", 121.0, 30.3, 24.0),
    DeviceSpec(
        r"\bRTX 4090\b", "RTX 4090", "NVIDIA GeForce RTX 4090 (Ada Lovelace architecture whitepaper)", 165.2, 82.6, 24.0
    ),
    # AMD Instinct: MI300X, MI325X and MI250X datasheets (fp32: vector peak).
    DeviceSpec(r"\bMI300X\b", "MI300X", "AMD Instinct MI300X (MI300X datasheet)", 1307.4, 163.4, 192.0),
    DeviceSpec(r"\bMI325X\b", "MI325X", "AMD Instinct MI325X (MI325X datasheet)", 1307.4, 163.4, 256.0),
    DeviceSpec(r"\bMI250X\b", "MI250X", "AMD Instinct MI250X (MI250X datasheet)", 383.0, 47.9, 128.0),
)


def find_device(name: str) -> DeviceSpec | None:
    """The table's entry for a device name, or None when the name is not one the table knows.

    A MIG slice owns a fraction of the GPU that its name does not state, so it
    is treated as unknown rather than credited with the whole GPU.
    """
    if "MIG" in name:
        return None
    for spec in DEVICES:
        if re.search(spec.pattern, name, flags=re.IGNORECASE):
            return spec
    return None


def known_device_names() -> list[str]:
    """What ``--device`` accepts, for error messages."""
    return ["cpu", *(spec.name for spec in DEVICES)]


@dataclass(frozen=True)
class PeakFlops:
    """One device's peak FLOP/s and where the figure comes from (printed once, so MFU can be audited)."""

    flops_per_second: float
    source: str


def lookup_gpu_peak(device_name: str, precision: str) -> PeakFlops | None:
    """The datasheet peak for ``device_name`` at ``precision`` (bf16/fp32); None for unknown GPUs and MIG slices."""
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision={precision!r}; expected 'bf16' or 'fp32'")
    spec = find_device(device_name)
    if spec is None:
        return None
    tflops = spec.bf16_tflops if precision == "bf16" else spec.fp32_tflops
    return PeakFlops(tflops * 1e12, f"{spec.label}, dense {precision}")


def measure_cpu_matmul_peak(
    size: int = 1024, min_seconds: float = 0.5, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Best fp32 matmul FLOP/s this process reaches with its intra-op threads.

    Best-of-several rather than mean: the question is what the CPU can do,
    and interference from other processes only ever makes a repetition slower.
    """
    import torch

    a = torch.randn(size, size)
    b = torch.randn(size, size)
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)  # first call pays for thread-pool start-up and page faults
    flops = 2.0 * size**3
    best = 0.0
    start = clock()
    while True:
        t0 = clock()
        torch.mm(a, b, out=out)
        t1 = clock()
        best = max(best, flops / max(t1 - t0, 1e-9))
        if t1 - start >= min_seconds:
            return best


def named_peak_flops(name: str, precision: str, override_tflops: float | None = None) -> PeakFlops | None:
    """The peak of the device called ``name``: the override, the datasheet for a GPU, or on ``cpu`` a measurement."""
    if override_tflops is not None:
        return PeakFlops(override_tflops * 1e12, "logging.peak_tflops_per_device")
    if name.lower() == "cpu":
        import torch

        source = f"measured fp32 matmul peak of this process on CPU ({torch.get_num_threads()} threads)"
        return PeakFlops(measure_cpu_matmul_peak(), source)
    return lookup_gpu_peak(name, precision)


def resolve_peak_flops(device: torch.device, precision: str, override_tflops: float | None = None) -> PeakFlops | None:
    """The MFU denominator for one device: the override, the datasheet, or (CPU) a measurement."""
    import torch

    if override_tflops is None and device.type not in ("cuda", "cpu"):
        return None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return named_peak_flops(name, precision, override_tflops)


@dataclass(frozen=True)
class Device:
    """What one process runs on: its name, peak FLOP/s and memory, each with where the figure comes from."""

    name: str
    is_gpu: bool
    peak_flops: float | None
    peak_source: str
    memory_bytes: int | None
    memory_source: str


def detect_gpu() -> tuple[str, int] | None:
    """(name, memory bytes) of this machine's first GPU from ``nvidia-smi``, which does not initialise CUDA here."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    first = out.strip().splitlines()[0] if out.strip() else ""
    name, _, mib = first.rpartition(",")
    try:
        return name.strip(), int(float(mib)) * 1024**2
    except ValueError:
        return None


def resolve_device(
    name: str | None,
    *,
    precision_on_gpu: str,
    memory_gib: float | None = None,
    peak_tflops: float | None = None,
    processes_per_node: int = 1,
) -> Device:
    """The device a plan is for: ``name`` ("cpu" or a GPU name), else this machine's GPU, else its CPU.

    The peak comes from ``peak_tflops`` (``logging.peak_tflops_per_device``),
    the datasheet table above, or on CPU a short matmul
    measurement; memory from ``memory_gib``, ``nvidia-smi``, the table above,
    or on CPU the machine's RAM shared by the processes of one node.
    """
    detected = detect_gpu() if name is None else None
    if name is None:
        name = detected[0] if detected else "cpu"
    if name.lower() == "cpu":
        import psutil

        peak = named_peak_flops(name, "fp32", peak_tflops)
        if memory_gib is not None:
            memory, memory_source = int(memory_gib * _GIB), "--device-memory-gib"
        else:
            memory = psutil.virtual_memory().total // max(processes_per_node, 1)
            memory_source = f"this machine's RAM / {max(processes_per_node, 1)} process(es) per node"
        return Device("CPU", False, peak.flops_per_second, peak.source, memory, memory_source)

    spec = find_device(name)
    if spec is None and detected is None and (peak_tflops is None or memory_gib is None):
        raise ValueError(
            f"--device {name!r} is not a device this planner knows; known: {', '.join(known_device_names())} "
            f"(or plan an unlisted device by giving both --device-memory-gib and logging.peak_tflops_per_device)"
        )
    found = named_peak_flops(name, precision_on_gpu, peak_tflops)
    peak, peak_source = (found.flops_per_second, found.source) if found else (None, "unknown device")
    if memory_gib is not None:
        memory, memory_source = int(memory_gib * _GIB), "--device-memory-gib"
    elif detected is not None:
        memory, memory_source = detected[1], "nvidia-smi"
    else:
        memory, memory_source = int(spec.memory_gib * _GIB), "datasheet"
    return Device(name, True, peak, peak_source, memory, memory_source)
