"""Checking a whole dataset against its manifest, stopping at the first bad shard or skipping bad ones.

Shards can be damaged after ``prepare`` finished (a truncated copy, a lost
file, bit rot).  Strict mode turns the first problem into an error; skip mode
lets a long job go on with the intact data while every skipped shard is logged
and counted, so that nothing is lost silently.  Each shard is checked by
``tar_shards.read_shard`` (structure, keys, lengths, token range, sha256).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from megatron_sffn.data.manifest import SPLITS, Manifest
from megatron_sffn.data.tar_shards import SampleFormat, ShardError, ShardSpec, read_shard, split_shards

log = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    """What was read intact, and every shard that was not, with the reason."""

    shards_ok: int = 0
    samples_ok: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)  # (shard url, error message)

    @property
    def ok(self) -> bool:
        return not self.bad


def iter_checked_shards(
    manifest: Manifest,
    split: str,
    skip_bad: bool = False,
    report: VerifyReport | None = None,
    on_bad: Callable[[str, str], None] | None = None,
) -> Iterator[tuple[ShardSpec, np.ndarray]]:
    """Yield ``(shard, samples)`` for each intact shard of ``split`` in manifest order.

    A bad shard raises ``ShardError`` unless ``skip_bad``; then it is recorded
    in ``report``, announced through ``on_bad(url, reason)`` (default: a logged
    warning) and passed over.
    """
    report = report if report is not None else VerifyReport()
    fmt = SampleFormat.of(manifest)
    for spec in split_shards(manifest, split):
        try:
            samples = read_shard(spec, fmt)
        except ShardError as exc:
            if not skip_bad:
                raise
            report.bad.append((spec.url, str(exc)))
            (on_bad or _log_bad)(spec.url, str(exc))
            continue
        report.shards_ok += 1
        report.samples_ok += len(samples)
        yield spec, samples


def verify_dataset(
    manifest: Manifest,
    splits: tuple[str, ...] = SPLITS,
    skip_bad: bool = False,
    tokenizer_identity: dict[str, Any] | None = None,
    on_bad: Callable[[str, str], None] | None = None,
) -> VerifyReport:
    """Check every shard of ``splits``, and first that the given tokenizer is the manifest's."""
    if tokenizer_identity is not None:
        manifest.check_tokenizer(tokenizer_identity)
    report = VerifyReport()
    for split in splits:
        for _ in iter_checked_shards(manifest, split, skip_bad, report, on_bad):
            pass
    return report


def _log_bad(url: str, reason: str) -> None:
    log.warning("skipping bad shard %s: %s", url, reason)
