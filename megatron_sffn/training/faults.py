"""Deterministic fault injection for the trainer's recovery paths: the faults of the ``debug`` section.

Recovery code (skipping a NaN step, saving on pre-emption, surviving a kill
during a save) only runs when something goes wrong, so it is exercised on
purpose, at an exact step (see :class:`~megatron_sffn.config.train.DebugConfig`).
With none of the faults set nothing changes: no hook is installed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Iterator

from ..config.train import DebugConfig

SAVE_PAUSED_MARKER = "SAVE-PAUSED"


class FaultPlan:
    """The faults of ``debug``, injected into one rank's training steps and saves."""

    def __init__(self, debug: DebugConfig, model_chunks: list, global_rank: int) -> None:
        self.debug = debug
        self.global_rank = global_rank
        self._corrupt = False
        if debug.nonfinite_steps:
            from megatron.core.utils import unwrap_model

            for chunk in model_chunks:
                unwrap_model(chunk).register_forward_hook(self._corrupt_output)

    def _corrupt_output(self, module, args, output):
        """The last stage's per-token losses times NaN during a corrupted step, as a diverging batch makes them."""
        from megatron.core import parallel_state

        if self._corrupt and parallel_state.is_pipeline_last_stage():
            return output * float("nan")
        return None

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Around training step ``step``: the signal of ``signal_at_step``, the NaN loss of ``nonfinite_steps``."""
        if step == self.debug.signal_at_step and self.global_rank == 0:
            os.kill(os.getpid(), signal.Signals[self.debug.signal])
        self._corrupt = step in self.debug.nonfinite_steps
        try:
            yield
        finally:
            self._corrupt = False

    def maybe_pause_in_save(self, step: int, partial_dir: Path) -> None:
        """Between writing the checkpoint of ``step`` and committing it (``pause_in_save_step``)."""
        if step == self.debug.pause_in_save_step:
            print(f"{SAVE_PAUSED_MARKER} {partial_dir}", file=sys.stderr, flush=True)
            time.sleep(self.debug.pause_in_save_s)
