"""The accelerators the project knows by name: dense peak FLOP/s and memory, each from the vendor's datasheet.

One table serves the MFU denominator (:mod:`.metrics`) and the dry run's
memory and speed plan (:mod:`.dry_run`).  A name is matched as a whole word
(``H1000`` is not an ``H100``), more specific entries first (``H100 NVL``
before ``H100``).  Peaks are dense: where a datasheet prints only the 2:4
sparsity figure, half of it is used.  fp32 is the non-tensor-core peak, what
PyTorch runs fp32 matmuls at unless TF32 is switched on.  Memory is the size
as sold, in GiB.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


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
    DeviceSpec(r"\bRTX 4090\b", "RTX 4090", "NVIDIA GeForce RTX 4090 (Ada Lovelace architecture whitepaper)",
               165.2, 82.6, 24.0),  # fmt: skip
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
