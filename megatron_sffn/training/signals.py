"""Pre-emption signals turned into a request to stop at the next step boundary.

Clusters announce pre-emption with SIGTERM (SLURM, Kubernetes) or a
configurable earlier signal such as SIGUSR1 (``sbatch --signal=USR1@120``).
Saving inside the handler is unsafe: the signal arrives in the middle of a
collective, and the other ranks may not have received it at all.  The handler
therefore only records the signal; the training loop reduces the flag across
all ranks at the end of every step (:meth:`StopRequest.flag`), so every rank
agrees on the same step, saves one consistent checkpoint, and exits.

Ctrl-C (SIGINT) is handled the same way; a second stop request after a
Ctrl-C (another Ctrl-C, or the SIGTERM torchrun turns it into) exits at once,
without saving and without a traceback (exit status 130), for a user who
does not want to wait for the step to end.  Repeated SIGTERMs alone (a
scheduler insisting) do not cut a save short.

Under torchrun the launcher process gets the signal, passes it on to the
workers and then dies of it itself (exit 1, a ``SignalException``).  The
launch scripts therefore set ``SFFN_STOP_RECORD``: each node's local rank 0 writes there how
the launch ended (:func:`write_stop_record`, called by the command line), so the launcher can
tell a clean save-and-stop (exit 0) from an interrupted one (:mod:`launch.run_torchrun`).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from types import FrameType

from ..atomic_io import write_text_atomic

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a process ended by Ctrl-C


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
        if self.received is not None and signal.SIGINT in (signum, self.received):
            # A second Ctrl-C; under torchrun it arrives as SIGTERM (torchrun aborts its wait and terminates).
            print(
                f"[train] second stop request ({signal.Signals(signum).name}): exiting now, without saving",
                file=sys.stderr,
                flush=True,
            )
            os._exit(EXIT_INTERRUPTED)  # no unwinding: a collective in flight would only hang
        if self.received is None:
            self.received = signal.Signals(signum)
            again = " (Ctrl-C again to exit at once, without saving)" if signum == signal.SIGINT else ""
            print(
                f"[train] received {self.received.name}: saving a checkpoint and stopping after the current step"
                + again,
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


def write_stop_record(path: str | os.PathLike, stopped_by: str, step: int, checkpoint: Path | None) -> None:
    """Tell the launcher how this launch ended (a JSON record at ``path``); each node's local rank 0 calls it."""
    record = {"stopped_by": stopped_by, "step": step, "checkpoint": str(checkpoint) if checkpoint else None}
    write_text_atomic(path, json.dumps(record) + "\n")
