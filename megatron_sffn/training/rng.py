"""Capture and restore every random-number generator a rank uses.

Saved per rank: Python's ``random``, NumPy's global generator, torch's CPU
generator, the CUDA generator of the current device, and megatron's named
model-parallel streams (its RNG tracker, used by dropout and initialisation).
They are only meaningful for the rank that produced them, so a checkpoint
restores them only when the resuming run has the same world size and layout;
otherwise the streams are re-seeded (see ``checkpointing``).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def _tracker():
    from megatron.core import tensor_parallel

    return tensor_parallel.get_cuda_rng_tracker()


def capture_rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": _tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    _tracker().set_states(state["tracker"])
    if torch.cuda.is_available():
        if "cuda" not in state:
            raise ValueError("checkpoint RNG state was saved without CUDA; it cannot restore a GPU run's generator")
        torch.cuda.set_rng_state(state["cuda"])
