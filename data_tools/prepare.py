"""Tokenize a corpus and pack it into webdataset shards described by a manifest.

    python -m data_tools.prepare data/corpus/*.parquet --tokenizer data/tokenizer.json --out data/shards

Each document gets EOS appended; documents are concatenated and cut into
``context_length + 1``-token samples; a hash of each document's text sends it
to the train or validation split.  The output depends only on the inputs and
settings (not on ``--workers`` or on interruptions): re-running an interrupted
job resumes from its last checkpoint, and re-running a finished job changes
nothing.  The manifest is written last, so a dataset without one is unfinished
and no loader will read it.

For interruption tests, ``SFFN_PREPARE_PAUSE_AFTER_SHARD_S`` makes the tool
sleep after each checkpoint so it can be killed at a known point.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from data_tools._encode import encode_batches, single_threaded_tokenizers
from data_tools._inputs import add_input_arguments, sources_from_args
from data_tools._prepare_state import PrepareState, SplitProgress, StateStore
from megatron_sffn import __version__
from megatron_sffn.data.manifest import (
    MANIFEST_NAME,
    SPLITS,
    Manifest,
    ShardInfo,
    SourceInfo,
    SplitInfo,
    TokenizerInfo,
    load_manifest,
    token_dtype_for_vocab,
    write_manifest_atomic,
)
from megatron_sffn.data.packing import PackingSettings, TokenPacker
from megatron_sffn.data.shard_writer import shard_name, write_shard_atomic
from megatron_sffn.data.text_sources import (
    SkippedDocuments,
    SourceFile,
    file_identity,
    iter_documents,
    known_document_count,
)
from megatron_sffn.data.tokenizer import load_tokenizer
from megatron_sffn.entry_setup import quiet_on_broken_pipe

PAUSE_ENV = "SFFN_PREPARE_PAUSE_AFTER_SHARD_S"


@dataclass(frozen=True, kw_only=True)
class PrepareOptions(PackingSettings):
    """The packing settings (recorded in the manifest, skipped documents counted there) and how to write them."""

    out: Path
    samples_per_shard: int = 1024
    workers: int = 1
    batch_documents: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("samples_per_shard", "batch_documents"):
            if getattr(self, name) < 1:
                raise ValueError(f"{self.setting_name(name)} is {getattr(self, name)}, expected a positive integer")

    @classmethod
    def setting_name(cls, field: str) -> str:
        return "--" + field.replace("_", "-")


@dataclass(frozen=True)
class PrepareResult:
    manifest: Manifest
    already_complete: bool
    documents: int  # processed by this invocation
    tokens: int
    seconds: float
    skipped: SkippedDocuments = field(default_factory=SkippedDocuments)  # over the whole corpus


def prepare(sources: list[SourceFile], options: PrepareOptions, progress: bool = True) -> PrepareResult:
    """Build (or finish, or confirm) the dataset in ``options.out``."""
    start = time.perf_counter()
    tokenizer = load_tokenizer(options.tokenizer, options.eos_token)
    identity = tokenizer.identity()
    settings = {
        "context_length": options.context_length,
        "samples_per_shard": options.samples_per_shard,
        "validation_fraction": options.validation_fraction,
        "seed": options.split_seed,
        "text_key": options.text_key,
        "eos_token": options.eos_token,
    }
    source_ids = [file_identity(s.path) for s in sources]
    out = options.out
    store = StateStore(out)
    if (out / MANIFEST_NAME).is_file():
        manifest = _confirm_finished(out, settings, source_ids, identity)
        store.clear()  # left behind only if the run stopped right after writing the manifest
        return PrepareResult(manifest, True, 0, 0, time.perf_counter() - start)
    # Skipped documents are counted from the first file on, also when resuming.
    skipped = SkippedDocuments()
    documents = iter_documents(sources, options.text_key, options.bad_documents, skipped, metadata=False)
    first = next(documents, None)  # read once: a remote file is not downloaded again to tokenize it
    if first is None:
        raise ValueError(f"the corpus is empty: {', '.join(s.path for s in sources)} hold no documents")

    fingerprint = hashlib.sha256(
        json.dumps({"settings": settings, "sources": source_ids, "tokenizer": identity}, sort_keys=True).encode()
    ).hexdigest()
    writer = _SplitWriter(
        out, store, fingerprint, options, tokenizer.eos_id, token_dtype_for_vocab(tokenizer.vocab_size)
    )
    docs = itertools.islice(itertools.chain([first], documents), writer.state.documents_done, None)
    batches = _batched((doc.text for doc in docs), options.batch_documents)
    encoded = encode_batches(
        batches, tokenizer, options.eos_token, options.validation_fraction, options.split_seed, options.workers
    )
    run_docs = run_tokens = 0
    bar = tqdm(
        total=known_document_count(sources),
        initial=writer.state.documents_done,
        unit="doc",
        desc="prepare",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    with bar:
        for batch in encoded:
            for to_validation, ids in batch:
                run_tokens += writer.add("validation" if to_validation else "train", ids)
            run_docs += len(batch)
            bar.update(len(batch))
            bar.set_postfix_str(f"{run_tokens / max(bar.format_dict['elapsed'], 1e-9):,.0f} tok/s", refresh=False)
    tails = writer.finish()

    state, sample_length = writer.state, options.sample_length
    manifest = Manifest(
        context_length=options.context_length,
        token_dtype=writer.dtype_name,
        samples_per_shard=options.samples_per_shard,
        tokenizer=TokenizerInfo(**identity),
        splits={
            name: SplitInfo(sp.samples, sp.samples * sample_length, list(sp.shards))
            for name, sp in state.splits.items()
        },
        sources=[SourceInfo(**s) for s in source_ids],
        settings=settings,
        created_by=f"megatron-sffn {__version__} data_tools.prepare",
        statistics={
            name: {
                "documents": sp.documents,
                "document_tokens": sp.document_tokens,
                "discarded_tail_tokens": tails[name],
            }
            for name, sp in state.splits.items()
        }
        | {"skipped_documents": skipped.count, "skipped_document_errors": skipped.examples},
    )
    write_manifest_atomic(manifest, out)
    store.clear()
    return PrepareResult(load_manifest(out), False, run_docs, run_tokens, time.perf_counter() - start, skipped)


class _SplitWriter:
    """Packs each split's documents, writes every full shard, and checkpoints after each.

    Starts from the last checkpoint in ``store`` when there is one.
    """

    def __init__(
        self, out: Path, store: StateStore, fingerprint: str, options: PrepareOptions, eos_id: int, dtype_name: str
    ) -> None:
        self.out, self.store, self.dtype_name = out, store, dtype_name
        self.samples_per_shard = options.samples_per_shard
        self.pause = float(os.environ.get(PAUSE_ENV, "0"))
        loaded = store.load(fingerprint)
        if loaded is None:
            self.state = PrepareState(fingerprint, 0, {name: SplitProgress() for name in SPLITS})
            pending = {name: np.zeros(0, dtype=np.int64) for name in SPLITS}
            store.save(self.state, pending)
        else:
            self.state, pending = loaded
        _reconcile_shards(out, self.state)
        self.packers = {name: TokenPacker(options.sample_length, eos_id, pending[name]) for name in SPLITS}

    def add(self, split: str, ids: np.ndarray) -> int:
        """Append one document (EOS added) to ``split``; returns its token count including EOS."""
        packer, progress = self.packers[split], self.state.splits[split]
        packer.add_document(ids)
        progress.documents += 1
        progress.document_tokens += len(ids) + 1
        self.state.documents_done += 1
        completed = False
        while (samples := packer.take(self.samples_per_shard)) is not None:
            self._write_shard(split, samples)
            completed = True
        if completed:
            self.store.save(self.state, {name: p.pending() for name, p in self.packers.items()})
            time.sleep(self.pause)
        return len(ids) + 1

    def finish(self) -> dict[str, int]:
        """Write each split's last, partial shard; returns the trailing tokens per split that fill no sample."""
        tails = {}
        for split, packer in self.packers.items():
            samples, tails[split] = packer.take_all()
            if len(samples):
                self._write_shard(split, samples)
        train = self.state.splits["train"]
        if not train.shards:
            raise ValueError(
                f"the corpus gives the train split {train.document_tokens} tokens, fewer than one sample of "
                f"context_length + 1 = {self.packers['train'].sample_length}; use more text or a shorter context"
            )
        return tails

    def _write_shard(self, split: str, samples: np.ndarray) -> None:
        progress = self.state.splits[split]
        rel = shard_name(split, len(progress.shards))
        digest = write_shard_atomic(self.out / rel, samples, progress.samples, self.dtype_name)
        progress.shards.append(ShardInfo(rel, len(samples), samples.size, digest))


def _confirm_finished(
    out: Path, settings: dict[str, Any], sources: list[dict[str, Any]], identity: dict[str, Any]
) -> Manifest:
    """A finished dataset made from these inputs is left as it is; one made from others is an error."""
    manifest = load_manifest(out)
    differences = [
        name
        for name, mine, theirs in (
            ("settings", settings, manifest.settings),
            ("sources", [SourceInfo(**s) for s in sources], manifest.sources),
            ("tokenizer", identity, asdict(manifest.tokenizer)),
        )
        if mine != theirs
    ]
    if differences:
        raise ValueError(
            f"{out / MANIFEST_NAME}: this directory already holds a finished dataset with different "
            f"{', '.join(differences)}; choose another --out or delete it"
        )
    return manifest


def _reconcile_shards(out: Path, state: PrepareState) -> None:
    """Make the shards on disk exactly those the checkpoint records.

    Shards written after the last checkpoint and half-written temp files are
    removed (they are regenerated identically); a recorded shard that is gone
    or altered cannot be regenerated without starting over, so it is an error.
    """
    for split in SPLITS:
        recorded = {s.path: s for s in state.splits[split].shards}
        for path in sorted((out / split).glob(f"{split}-*.tar*")):
            if f"{split}/{path.name}" not in recorded:
                path.unlink()
        for shard in recorded.values():
            path = out / shard.path
            if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != shard.sha256:
                raise ValueError(
                    f"{path}: shard recorded by the last checkpoint is missing or was modified; "
                    f"delete {out} and prepare again"
                )


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


@quiet_on_broken_pipe
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools.prepare", description=__doc__.split("\n\n")[0])
    add_input_arguments(parser)
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json path or tiktoken encoding name")
    parser.add_argument("--out", required=True, type=Path, help="dataset directory to create (or resume)")
    defaults = PrepareOptions(tokenizer="", out=Path())
    parser.add_argument(
        "--context-length",
        type=int,
        default=defaults.context_length,
        help="tokens a model sees per sample; samples hold one more (the last target)",
    )
    parser.add_argument("--samples-per-shard", type=int, default=defaults.samples_per_shard)
    parser.add_argument(
        "--validation-fraction",
        type=float,
        default=defaults.validation_fraction,
        help="expected fraction of documents sent to the validation split",
    )
    parser.add_argument("--seed", type=int, default=defaults.split_seed, help="seed of the document-hash split")
    parser.add_argument("--eos-token", default=None, help="end-of-text token (default: detected from the tokenizer)")
    parser.add_argument(
        "--workers",
        type=int,
        default=max(1, (os.cpu_count() or 1) - 1),
        help="tokenizer processes; the output does not depend on it",
    )
    parser.add_argument(
        "--batch-documents", type=int, default=defaults.batch_documents, help="documents sent to a worker at a time"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    single_threaded_tokenizers()
    try:
        sources = sources_from_args(args)  # a missing input is reported before a bad option
        options = PrepareOptions(
            tokenizer=args.tokenizer,
            out=args.out,
            context_length=args.context_length,
            samples_per_shard=args.samples_per_shard,
            validation_fraction=args.validation_fraction,
            split_seed=args.seed,
            text_key=args.text_key,
            eos_token=args.eos_token,
            workers=args.workers,
            batch_documents=args.batch_documents,
            bad_documents=args.bad_documents,
        )
        result = prepare(sources, options, progress=not args.quiet)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"prepare: error: {exc}", file=sys.stderr)
        return 1
    m = result.manifest
    if result.already_complete:
        print(f"prepare: {args.out} is already complete; nothing to do", file=sys.stderr)
    else:
        rate = result.seconds and 1 / result.seconds
        print(
            f"prepare: {result.documents} documents, {result.tokens} tokens in {result.seconds:.1f} s "
            f"({result.documents * rate:,.0f} docs/s, {result.tokens * rate:,.0f} tokens/s)",
            file=sys.stderr,
        )
        if result.skipped.count:
            print(f"prepare: {result.skipped.summary()}", file=sys.stderr)
    for name in SPLITS:
        s = m.split(name)
        print(
            f"prepare: {name}: {s.samples} samples of {m.sample_length} tokens in {len(s.shards)} shards",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
