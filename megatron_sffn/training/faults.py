"""Deterministic fault injection for the trainer's recovery paths.

Recovery code (skipping a NaN step, saving on pre-emption, surviving a kill
during a save) only runs when something goes wrong, so it is exercised on
purpose: the faults below are read from environment variables, which lets a
test drive an unmodified launch command (``torchrun ... -m megatron_sffn.train``)
and trigger the fault at an exact step instead of racing a timer.  With none
of the variables set nothing changes.

``SFFN_FAULT_NONFINITE_STEPS=3,4``
    the loss of these steps (1-based) is multiplied by NaN on the last
    pipeline stage, as a diverging batch would make it.
``SFFN_FAULT_SIGNAL_AT_STEP=5`` (or ``5:SIGUSR1``)
    global rank 0 sends itself the signal (default SIGTERM) at the end of that
    step; the other ranks learn of it only through the trainer's reduction,
    as on a cluster where not every process is signalled at the same instant.
``SFFN_FAULT_PAUSE_IN_SAVE=4:30``
    in the save of step 4, every rank sleeps 30 seconds after its checkpoint
    files are written and before the checkpoint is committed, announcing
    ``SAVE-PAUSED <dir>`` on stderr, so a test can SIGKILL it mid-save.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ENV_NONFINITE_STEPS = "SFFN_FAULT_NONFINITE_STEPS"
ENV_SIGNAL_AT_STEP = "SFFN_FAULT_SIGNAL_AT_STEP"
ENV_PAUSE_IN_SAVE = "SFFN_FAULT_PAUSE_IN_SAVE"
SAVE_PAUSED_MARKER = "SAVE-PAUSED"


def _parse_int(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}: {text!r} is not an integer step") from None


@dataclass(frozen=True)
class FaultPlan:
    nonfinite_steps: frozenset[int] = field(default_factory=frozenset)
    signal_at_step: int | None = None
    signal_kind: signal.Signals = signal.SIGTERM
    pause_in_save_step: int | None = None
    pause_in_save_s: float = 0.0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "FaultPlan":
        env = os.environ if env is None else env
        steps = env.get(ENV_NONFINITE_STEPS, "").strip()
        nonfinite = frozenset(_parse_int(ENV_NONFINITE_STEPS, s) for s in steps.split(",") if s.strip())
        signal_at, kind = None, signal.SIGTERM
        spec = env.get(ENV_SIGNAL_AT_STEP, "").strip()
        if spec:
            step_text, _, name = spec.partition(":")
            signal_at = _parse_int(ENV_SIGNAL_AT_STEP, step_text)
            if name:
                try:
                    kind = signal.Signals[name]
                except KeyError:
                    raise ValueError(
                        f"environment variable {ENV_SIGNAL_AT_STEP}={spec!r}: unknown signal {name!r}"
                    ) from None
        pause_step, pause_s = None, 0.0
        pause = env.get(ENV_PAUSE_IN_SAVE, "").strip()
        if pause:
            step_text, _, seconds = pause.partition(":")
            pause_step = _parse_int(ENV_PAUSE_IN_SAVE, step_text)
            try:
                pause_s = float(seconds)
            except ValueError:
                raise ValueError(
                    f"environment variable {ENV_PAUSE_IN_SAVE}={pause!r}: expected STEP:SECONDS"
                ) from None
        return cls(nonfinite, signal_at, kind, pause_step, pause_s)

    def corrupt_loss(self, step: int) -> bool:
        return step in self.nonfinite_steps

    def maybe_signal(self, step: int, global_rank: int) -> None:
        if step == self.signal_at_step and global_rank == 0:
            os.kill(os.getpid(), self.signal_kind)

    def maybe_pause_in_save(self, step: int, partial_dir: Path) -> None:
        if step == self.pause_in_save_step:
            print(f"{SAVE_PAUSED_MARKER} {partial_dir}", file=sys.stderr, flush=True)
            time.sleep(self.pause_in_save_s)
