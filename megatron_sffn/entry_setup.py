"""What every command-line entry point shares: silenced known-harmless warnings, a quiet broken pipe.

megatron-core warns at import time, once per module and per process, that
Transformer Engine and Apex are missing, and a torchrun job repeats each
line on every rank: a TP=2 evaluation printed 41 lines for one result.  The
filters below are narrow (the exact message *and* the module that emits
it), so any other warning from the same modules still shows, and the
information they carried is given once, by rank 0, in
:func:`missing_accelerators_note`.  They are installed here and nowhere
else, before megatron is imported.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import warnings
from collections.abc import Callable

# (category, message regex, regex of the emitting module)
KNOWN_HARMLESS_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    # The optimizer, grad clipping and mixed-precision helpers fall back to PyTorch implementations.
    (UserWarning, r"Transformer Engine and Apex are not installed", r"megatron\.core\."),
    (UserWarning, r"Apex is not installed\. Falling back to Torch Norm", r"megatron\.core\.models\.backends"),
    # megatron's own TransformerConfig default (cuda_graph_scope="full"); CUDA graphs are not used here.
    (UserWarning, r"full scope is deprecated\. Use empty cuda_graph_scope", r"megatron\.core\.transformer\."),
    # megatron's torch_dist checkpoint loader still calls torch's deprecated entry point.
    (FutureWarning, r"`load_state_dict` is deprecated", r"megatron\.core\.dist_checkpointing\."),
    # megatron's tensor-parallel mappings call the two collectives torch renamed (to *_single, which this
    # project calls); torch's c10d wrapper is the module that emits the notice.
    (
        FutureWarning,
        r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
        r"torch\.distributed\.c10d_logger",
    ),
)

# megatron's tensor-parallel linears advise, once per rank at TP > 1, setting CUDA_DEVICE_MAX_CONNECTIONS=1
# to overlap the gradient all-reduce of backward with compute on the GPU. It is kept for training on GPUs
# (the launch scripts set the variable; a bare torchrun should hear it) and silenced everywhere else:
# forward-only commands (generate, evaluate) and CPU runs, where the variable means nothing.
GPU_BACKWARD_ADVICE: tuple[tuple[type[Warning], str, str], ...] = (
    (
        UserWarning,
        r"When using (async grad allreduce|sequence parallelism) it is recommended to set the environment "
        r"variable CUDA_DEVICE_MAX_CONNECTIONS",
        r"megatron\.core\.tensor_parallel\.layers",
    ),
)

OPTIONAL_ACCELERATORS = {"transformer_engine": "Transformer Engine", "apex": "Apex"}


def quiet_known_warnings(*, backward_on_gpu: bool = False) -> None:
    """Install the filters (idempotent: ``warnings`` drops duplicate filters).

    ``backward_on_gpu``: the command trains on GPUs, so megatron's advice on overlapping its backward
    all-reduce (:data:`GPU_BACKWARD_ADVICE`) stays visible.
    """
    extra = () if backward_on_gpu else GPU_BACKWARD_ADVICE
    for category, message, module in KNOWN_HARMLESS_WARNINGS + extra:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def missing_accelerators() -> list[str]:
    return [name for module, name in OPTIONAL_ACCELERATORS.items() if importlib.util.find_spec(module) is None]


def missing_accelerators_note() -> str | None:
    """One line for rank 0 to print in place of the silenced warnings (None when both are installed)."""
    missing = missing_accelerators()
    if not missing:
        return None
    return (
        f"{' and '.join(missing)} not installed: megatron-core uses its PyTorch implementations "
        f"(optimizer, gradient clipping, layer norm): results are the same, without fused GPU kernels"
    )


def quiet_on_broken_pipe(main: Callable[..., int]) -> Callable[..., int]:
    """Decorate a command's ``main``: when the reader of its output leaves (``cmd | head``), exit 1 quietly.

    Without it Python prints a ``BrokenPipeError`` traceback, and then another one when it flushes
    stdout at exit; pointing stdout at /dev/null stops the second.
    """

    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1

    return run
