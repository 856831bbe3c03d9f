"""Pre-emption signals turned into a request to stop at the next step boundary.

Clusters announce pre-emption with SIGTERM (SLURM, Kubernetes) or a
configurable earlier signal such as SIGUSR1 (``sbatch --signal=USR1@120``).
Saving inside the handler is unsafe: the signal arrives in the middle of a
collective, and the other ranks may not have received it at all.  The handler
therefore only records the signal; the training loop reduces the flag across
all ranks at the end of every step (:meth:`StopRequest.flag`), so every rank
agrees on the same step, saves one consistent checkpoint, and exits.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Records the first stop signal received while installed."""

    def __init__(self, signals: tuple[signal.Signals, ...] = DEFAULT_SIGNALS) -> None:
        self.signals = signals
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    def install(self) -> "StopRequest":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
            print(
                f"[train] received {self.received.name}: saving a checkpoint and stopping after the current step",
                file=sys.stderr,
                flush=True,
            )

    @property
    def flag(self) -> float:
        """1.0 once a signal arrived, for the cross-rank max-reduction at the step boundary."""
        return 0.0 if self.received is None else 1.0

    def __enter__(self) -> "StopRequest":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()
