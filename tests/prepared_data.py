"""Prepared datasets written directly in the shard format (shard writer plus manifest), without ``prepare``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from megatron_sffn.data.manifest import Manifest, ShardInfo, SplitInfo, TokenizerInfo, write_manifest_atomic
from megatron_sffn.data.shard_writer import shard_name, write_shard_atomic


def write_prepared(
    out: Path,
    splits: dict[str, np.ndarray],
    *,
    context_length: int,
    per_shard: int,
    tokenizer: TokenizerInfo,
    settings: dict[str, Any],
    created_by: str,
) -> Manifest:
    """Write each split's rows (``[samples, context_length + 1]`` token ids) as uint16 shards of ``per_shard``
    samples, then the manifest; returns the manifest written."""
    infos = {}
    for split, samples in splits.items():
        shards = []
        for first in range(0, len(samples), per_shard):
            rows = samples[first : first + per_shard]
            path = shard_name(split, len(shards))
            shards.append(ShardInfo(path, len(rows), rows.size, write_shard_atomic(out / path, rows, first, "uint16")))
        infos[split] = SplitInfo(len(samples), len(samples) * (context_length + 1), shards)
    manifest = Manifest(
        context_length=context_length,
        samples_per_shard=per_shard,
        tokenizer=tokenizer,
        splits=infos,
        sources=[],
        settings=settings,
        created_by=created_by,
        token_dtype="uint16",
    )
    write_manifest_atomic(manifest, out)
    return manifest
