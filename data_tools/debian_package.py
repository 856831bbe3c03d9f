"""Getting at the files of a Debian package without installing it.

The default corpus ships in Debian documentation packages.  Using the
installed copy when there is one, and otherwise unpacking the ``.deb`` that
``apt-get download`` fetches (which needs no root), keeps corpus building free
of system changes on a developer machine while working on a fresh CI image.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


class PackageUnavailableError(RuntimeError):
    """The package is neither installed nor downloadable; the message gives the command that fixes it."""


@dataclass(frozen=True)
class PackageFiles:
    name: str
    version: str
    root: Path  # stands for "/" of the package: its files are under root/usr/...


def package_files(name: str, probe: str, cache: Path) -> PackageFiles:
    """The installed package if ``/probe`` exists, or else its ``.deb`` unpacked under ``cache``."""
    installed = _installed_version(name)
    if installed is not None and (Path("/") / probe).exists():
        return PackageFiles(name, installed, Path("/"))
    cache.mkdir(parents=True, exist_ok=True)
    debs = sorted(cache.glob(f"{name}_*.deb"))
    if not debs:
        _download(name, cache)
        debs = sorted(cache.glob(f"{name}_*.deb"))
    deb = debs[-1]
    version = _run(["dpkg-deb", "-f", str(deb), "Version"]).strip()
    root = cache / f"{name}_{version}"
    if not (root / probe).exists():
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        _run(["dpkg-deb", "-x", str(deb), str(tmp)])
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
    return PackageFiles(name, version, root)


def _installed_version(name: str) -> str | None:
    if shutil.which("dpkg-query") is None:
        return None
    out = subprocess.run(["dpkg-query", "-W", "-f=${Status}\t${Version}", name], capture_output=True, text=True)
    status, _, version = out.stdout.partition("\t")
    return version if out.returncode == 0 and status.endswith(" installed") else None


def _download(name: str, cache: Path) -> None:
    """``apt-get download``; as root, refresh the package lists once if that fails (fresh images have none)."""
    fix = f"`apt-get update && apt-get install -y {name}` (as root) and run this again"
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise PackageUnavailableError(
            f"Debian package {name} is not installed and apt-get/dpkg-deb are missing; run {fix}"
        )
    attempt = subprocess.run(["apt-get", "download", name], cwd=cache, capture_output=True, text=True)
    if attempt.returncode != 0 and os.geteuid() == 0:
        print(f"apt-get download {name} failed; running apt-get update", file=sys.stderr)
        subprocess.run(["apt-get", "update"], capture_output=True, text=True)
        attempt = subprocess.run(["apt-get", "download", name], cwd=cache, capture_output=True, text=True)
    if attempt.returncode != 0:
        raise PackageUnavailableError(f"cannot download Debian package {name} ({attempt.stderr.strip()}); run {fix}")


def _run(cmd: list[str]) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise PackageUnavailableError(f"{' '.join(cmd)} failed: {result.stderr.strip()}")
    return result.stdout
