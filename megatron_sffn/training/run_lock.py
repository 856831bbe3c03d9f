"""An exclusive lock on a run directory for the life of a training job.

Two jobs writing one run directory corrupt it: the second one's start-up
cleanup deletes the first one's in-progress ``.partial`` save.  The lock is
the file ``<run_dir>/.lock``, created atomically by hard-linking a fully
written temporary file to that name (``link`` fails if the name exists, also
on NFS, where ``O_EXCL`` was historically unreliable).  It holds the holder's
host, pid, process start time and torchrun run id / restart count, so a
refusal can say who holds it, and its modification time is refreshed every
:data:`HEARTBEAT_S` seconds while the job lives.

A lock is *stale*, and is taken over, when

* its holder ran on this host and that process no longer exists (same pid
  and start time), or
* its holder is the previous attempt of this same torchrun job (same run id,
  lower restart count): torchrun restarted the workers after a failure, or
* its holder ran on another host and the heartbeat stopped more than
  :data:`STALE_AFTER_S` seconds ago (a dead node cannot be asked).

Takeover renames the stale file to a unique name first (only one of several
contenders succeeds) and checks that what it moved is the lock it judged
stale before creating its own.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

LOCK_FILE = ".lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


class RunDirLocked(ValueError):
    """Another live job holds the run directory."""


@dataclass(frozen=True)
class LockHolder:
    host: str
    pid: int
    started: float  # the holding process's start time (seconds since the epoch)
    run_id: str | None = None  # torchrun's TORCHELASTIC_RUN_ID
    restart: int | None = None  # torchrun's TORCHELASTIC_RESTART_COUNT

    @classmethod
    def this_process(cls) -> "LockHolder":
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            started=psutil.Process().create_time(),
            run_id=os.environ.get("TORCHELASTIC_RUN_ID"),
            restart=int(restart) if restart is not None else None,
        )

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.started))
        job = f", torchrun run {self.run_id} attempt {self.restart}" if self.run_id is not None else ""
        return f"host {self.host}, pid {self.pid}, started {when}{job}"


def _read(path: Path) -> tuple[LockHolder | None, float]:
    """The holder recorded in ``path`` (None if unreadable or half-written) and the file's age in seconds."""
    try:
        age = time.time() - path.stat().st_mtime
        holder = LockHolder(**json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise
    except (OSError, ValueError, TypeError):
        return None, time.time() - path.stat().st_mtime
    return holder, age


def _process_alive(pid: int, started: float) -> bool:
    try:
        return abs(psutil.Process(pid).create_time() - started) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def stale_reason(holder: LockHolder | None, age_s: float, me: LockHolder) -> str | None:
    """Why the lock of ``holder`` (last heartbeat ``age_s`` ago) may be taken over by ``me``; None if it is live."""
    if holder is None:
        return f"unreadable lock file, last written {age_s:.0f} s ago" if age_s > STALE_AFTER_S else None
    if holder.run_id is not None and holder.run_id == me.run_id and (holder.restart or 0) < (me.restart or 0):
        return f"held by attempt {holder.restart} of this torchrun job, which torchrun restarted"
    if holder.host == me.host:
        return None if _process_alive(holder.pid, holder.started) else f"process {holder.pid} no longer exists"
    if age_s > STALE_AFTER_S:
        return f"no heartbeat from {holder.host} for {age_s:.0f} s (more than {STALE_AFTER_S:.0f} s)"
    return None


def holder_of(run_dir: str | os.PathLike, job_id: str | None = None) -> LockHolder | None:
    """The live job holding ``run_dir``, or None when the directory is free (no lock, a stale one, or our own).

    ``job_id`` is the torchrun run id of the job about to start (a multi-node
    launch checks on every node, and rank 0 on another node may hold the lock
    already); inside torchrun it is the worker's own run id and attempt.
    """
    path = Path(run_dir) / LOCK_FILE
    try:
        holder, age = _read(path)
    except FileNotFoundError:
        return None
    me = LockHolder.this_process()
    if holder is not None and holder.run_id is not None:
        if job_id is not None and holder.run_id == job_id:
            return None  # rank 0 of the job this launch joins got there first
        if job_id is None and (holder.run_id, holder.restart) == (me.run_id, me.restart):
            return None  # rank 0 of this very attempt got there first
    if stale_reason(holder, age, me) is not None:
        return None
    return holder if holder is not None else LockHolder("?", -1, path.stat().st_mtime)


def locked_message(run_dir: str | os.PathLike, holder: LockHolder) -> str:
    return (
        f"run directory {run_dir} is in use by another job ({holder.describe()}); wait for it to end or stop it. "
        f"If that job is gone, remove {Path(run_dir) / LOCK_FILE}"
    )


class RunLock:
    """Hold ``<run_dir>/.lock`` from :meth:`acquire` to :meth:`release`, refreshing its heartbeat."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.me = LockHolder.this_process()
        self.took_over: str | None = None  # why a stale lock was replaced, for the log
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run_dir / f"{LOCK_FILE}.{self.me.host}.{self.me.pid}.tmp"
        tmp.write_text(json.dumps(asdict(self.me)), encoding="utf-8")
        try:
            for _ in range(3):  # a contender may take over or release between our steps
                try:
                    os.link(tmp, self.path)
                    break
                except FileExistsError:
                    self._take_over_if_stale()
            else:
                raise RunDirLocked(f"could not lock {self.run_dir}: other jobs keep replacing {self.path}")
        finally:
            tmp.unlink(missing_ok=True)
        self._thread = threading.Thread(target=self._heartbeat, name="run-dir-lock", daemon=True)
        self._thread.start()
        return self

    def _take_over_if_stale(self) -> None:
        try:
            holder, age = _read(self.path)
        except FileNotFoundError:
            return  # released meanwhile: try again
        reason = stale_reason(holder, age, self.me)
        if reason is None:
            raise RunDirLocked(locked_message(self.run_dir, holder or LockHolder("?", -1, time.time() - age)))
        moved = self.run_dir / f"{LOCK_FILE}.stale.{self.me.host}.{self.me.pid}"
        try:
            os.replace(self.path, moved)
        except FileNotFoundError:
            return  # another contender moved it first
        try:
            if _read(moved)[0] != holder:  # we moved a fresh lock another contender had just created
                os.link(moved, self.path)
                raise RunDirLocked(f"could not lock {self.run_dir}: another job took it over at the same time")
        finally:
            moved.unlink(missing_ok=True)
        self.took_over = f"took over the lock of {holder.describe() if holder else 'an unknown job'}: {reason}"

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if _read(self.path)[0] == self.me:
                self.path.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
