"""The trainer's entry points: a resumable training stream and a validation pass per rank.

    layout = StreamLayout(micro_batch_size=4, dp_rank=r, dp_size=R, num_workers=2)
    train = build_train_loader("data/shards", layout)
    batches = iter(train)                # endless; megatron's ``train_data_iterator``
    state = train.state_dict()           # save with the checkpoint (JSON-serialisable)
    train.load_state_dict(state)         # at any dp size / worker count; then iter() again

    val = build_validation_loader("data/shards", layout)
    for batch in val: ...                # len(val) batches, the same on every rank

Which sample sits at which position depends only on the dataset, ``seed`` and
``lanes`` (see ``order``); the parallel layout only decides who reads it.
From a resume point ``c`` (``consumed_samples``) on, position ``g >= c``
goes to rank ``g % dp_size``, so each global batch is split evenly whenever
``dp_size`` divides it.  ``lanes`` must be a multiple of
``dp_size * max(num_workers, 1)``: pick it for the largest layout you will
ever resume on, and keep it for the whole run.  Raw text is streamed the same
way by ``on_the_fly.build_text_train_loader``; its states must be combined
over ranks with ``streaming.merge_states`` before resuming at another dp size
(harmless, and summing the counters, for prepared shards too).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from .manifest import Manifest, load_manifest
from .sharded import ShardSource
from .streaming import StreamLayout, TrainStream
from .tar_shards import SampleFormat, split_shards
from .tokenizer import Tokenizer, load_tokenizer
from .validation import ShardRows, ValidationLoader

DEFAULT_LANES = 64
# Rows a worker sends per message: ~64k tokens amortises the inter-process cost.
CHUNK_TOKENS = 1 << 16
MAX_CHUNK_ROWS = 256

DatasetArg = str | os.PathLike[str] | Manifest
TokenizerArg = str | Tokenizer | dict[str, Any] | None


def chunk_rows_for(sample_length: int) -> int:
    return max(1, min(MAX_CHUNK_ROWS, CHUNK_TOKENS // sample_length))


def open_dataset(dataset: DatasetArg, tokenizer: TokenizerArg = None) -> Manifest:
    """The manifest of a prepared dataset, checked against the trainer's tokenizer when one is given.

    ``tokenizer`` may be a spec (``tokenizer.json`` path or tiktoken name), a
    loaded tokenizer or its ``identity()`` dict.
    """
    manifest = dataset if isinstance(dataset, Manifest) else load_manifest(dataset)
    if tokenizer is not None:
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer)
        manifest.check_tokenizer(tokenizer if isinstance(tokenizer, dict) else tokenizer.identity())
    return manifest


def build_train_loader(
    dataset: DatasetArg,
    layout: StreamLayout,
    *,
    seed: int = 1234,
    lanes: int = DEFAULT_LANES,
    tokenizer: TokenizerArg = None,
    skip_bad_shards: bool = False,
    shard_url_template: str | None = None,
    verify_checksums: bool = True,
) -> TrainStream:
    """The endless training stream of rank ``layout.dp_rank`` over the dataset's train split.

    ``shard_url_template`` (``"{path}"`` is the manifest's shard path) reads
    the shards from elsewhere, e.g. ``"pipe:aws s3 cp s3://bucket/ds/{path} -"``.
    """
    manifest = open_dataset(dataset, tokenizer)
    shards = split_shards(manifest, "train", shard_url_template, verify_checksums)
    if not shards:
        raise ValueError(f"{manifest.location}: the train split has no shards")
    fmt = SampleFormat.of(manifest)
    source = ShardSource(shards, fmt, seed, lanes, skip_bad_shards)
    identity = {"source": "shards", "seed": seed, "data": _fingerprint(manifest)}
    return TrainStream(source, layout, identity, lanes, chunk_rows_for(fmt.sample_length))


def build_validation_loader(
    dataset: DatasetArg,
    layout: StreamLayout,
    *,
    tokenizer: TokenizerArg = None,
    skip_bad_shards: bool = False,
    batches_multiple_of: int = 1,
    shard_url_template: str | None = None,
    verify_checksums: bool = True,
) -> ValidationLoader:
    """One pass over the validation split for rank ``layout.dp_rank`` (see ``validation`` for the padding rule)."""
    manifest = open_dataset(dataset, tokenizer)
    shards = split_shards(manifest, "validation", shard_url_template, verify_checksums)
    return ValidationLoader(ShardRows(shards, SampleFormat.of(manifest), skip_bad_shards), layout, batches_multiple_of)


def _fingerprint(manifest: Manifest) -> str:
    """Identifies the train split's content, wherever its shards are stored."""
    shards = [[s.samples, s.sha256] for s in manifest.split("train").shards]
    text = json.dumps({"sample_length": manifest.sample_length, "shards": shards})
    return hashlib.sha256(text.encode()).hexdigest()[:16]
