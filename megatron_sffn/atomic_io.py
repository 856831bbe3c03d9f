"""Atomic file replacement, shared by everything that writes state a reader may see mid-write
(manifests, the ``latest`` checkpoint pointer, resolved configs, resume state, exported models)."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` so that readers see the old or the new content, never a mix.

    The temporary name is unique per process and created with ``open`` (not
    ``mkstemp``) so the file gets the umask's permissions like any other.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def new_directory_atomic(path: str | os.PathLike) -> Iterator[Path]:
    """Build a new directory ``path`` under a temporary name beside it, renamed into place on success.

    ``path`` must not exist.  If the body raises (or the process dies), no
    directory named ``path`` appears; the temporary one is removed on an
    exception and otherwise keeps a dot-name that says it is partial.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; choose a new output directory or remove it first")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.partial-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
        if path.exists():
            raise FileExistsError(f"{path} appeared while it was being written; the new copy is discarded")
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(path.parent)
