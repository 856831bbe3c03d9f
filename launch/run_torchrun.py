"""torchrun with an exit status that tells a clean save-and-stop from a failure (used by the launch scripts).

    python launch/run_torchrun.py [torchrun options] -m megatron_sffn.train CONFIG.yaml [overrides ...]

torchrun passes SIGTERM / SIGINT / SIGUSR1 on to its workers, waits for them
(``--shutdown-timeout``), and then exits 1 with a ``SignalException``
traceback, even when every worker saved a checkpoint and exited 0.  This
runs torchrun's own ``main`` in-process and, when a stop signal ends it,
reads the record the workers' local rank 0 leaves in ``$SFFN_STOP_RECORD``:

* 0: the trainer ended cleanly (after a signal: it saved at the end of its
  last step);
* 128 + signal number (143 for SIGTERM, 130 for SIGINT): it was stopped
  before that, e.g. by a second Ctrl-C; the latest checkpoint is intact.

A second signal while torchrun waits for its workers aborts torchrun's wait;
it is passed on to the workers still running (a second SIGINT makes them
exit at once) and they are waited for, so none is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

STOP_RECORD_ENV = "SFFN_STOP_RECORD"  # the trainer's megatron_sffn.train.ENV_STOP_RECORD
_WAIT_FOR_WORKERS_S = 600.0


def _finish_workers(first: signal.Signals) -> None:
    """Pass signals on to workers that outlived torchrun's wait, then wait for them (SIGKILL past the limit)."""
    import psutil

    workers = psutil.Process().children(recursive=False)
    if not workers:
        return

    def forward(signum: int, frame) -> None:
        for worker in workers:
            try:
                worker.send_signal(signum)
            except psutil.NoSuchProcess:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP):
        signal.signal(sig, forward)
    forward(first, None)
    _, alive = psutil.wait_procs(workers, timeout=_WAIT_FOR_WORKERS_S)
    for worker in alive:
        worker.kill()


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun_main

    record = Path(os.environ[STOP_RECORD_ENV]) if os.environ.get(STOP_RECORD_ENV) else None
    if record is not None:
        record.unlink(missing_ok=True)
    try:
        torchrun_main(argv)
    except SignalException as exc:
        sig = signal.Signals(exc.sigval)
        _finish_workers(sig)
        outcome = json.loads(record.read_text(encoding="utf-8")) if record is not None and record.exists() else None
        if outcome is not None:
            saved = f"saved {outcome['checkpoint']} and " if outcome.get("checkpoint") else ""
            print(
                f"[launch] {sig.name}: the workers {saved}stopped cleanly after step {outcome['step']}; "
                f"relaunch the same command to resume",
                file=sys.stderr,
                flush=True,
            )
            return 0
        print(
            f"[launch] {sig.name}: stopped before the workers finished a save; relaunching the same command "
            f"resumes from the latest complete checkpoint",
            file=sys.stderr,
            flush=True,
        )
        return 128 + sig.value
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
