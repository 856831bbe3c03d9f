"""Show, decode and verify a prepared dataset.

    python -m data_tools.inspect data/shards                      # manifest and shard statistics
    python -m data_tools.inspect data/shards --decode 3 --split validation
    python -m data_tools.inspect data/shards --verify --tokenizer data/tokenizer.json

``--verify`` reads every shard and checks it against the manifest (sample
count, sample length, token range, sha256) and, given ``--tokenizer``, that the
tokenizer is the one the dataset was made with.  It stops at the first problem
unless ``--skip-bad``, which reports every bad shard.  The exit code is
non-zero whenever anything failed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from megatron_sffn.data.manifest import SPLITS, Manifest, load_manifest
from megatron_sffn.data.shard_verify import verify_dataset
from megatron_sffn.data.tar_shards import SampleFormat, read_shard, split_shards
from megatron_sffn.data.tokenizer import Tokenizer, TokenizerUnavailableError, load_tokenizer
from megatron_sffn.entry_setup import quiet_on_broken_pipe


def describe(manifest: Manifest) -> str:
    """Human-readable summary of the manifest and the shard files."""
    tok = manifest.tokenizer
    lines = [
        f"dataset        {manifest.location}",
        f"format         {manifest.format} ({manifest.created_by})",
        f"samples        {manifest.sample_length} tokens each (context {manifest.context_length}), "
        f"{manifest.token_dtype}, {manifest.samples_per_shard} per shard",
        f"tokenizer      {tok.spec} ({tok.type}, vocab {tok.vocab_size}, eos {tok.eos_id}, sha256 {tok.sha256[:12]})",
        f"sources        {len(manifest.sources)} files, {sum(s.size for s in manifest.sources):,} bytes",
        "settings       " + ", ".join(f"{k}={v}" for k, v in sorted(manifest.settings.items())),
    ]
    for name in SPLITS:
        split = manifest.split(name)
        sizes = [os.path.getsize(p) for p in manifest.shard_locations(name) if os.path.isfile(p)]
        stats = manifest.statistics.get(name, {})
        lines.append(
            f"{name:<14} {split.samples:,} samples, {split.tokens:,} tokens, {len(split.shards)} shards "
            f"({sum(sizes):,} bytes on disk)"
        )
        if stats:
            lines.append(
                f"{'':<14} from {stats['documents']:,} documents ({stats['document_tokens']:,} tokens incl. EOS; "
                f"{stats['discarded_tail_tokens']:,} trailing tokens did not fill a sample)"
            )
    return "\n".join(lines)


def decode_sample(manifest: Manifest, split: str, index: int, tokenizer: Tokenizer) -> str:
    """Text of sample ``index`` of ``split`` (read from its shard with all checks)."""
    total = manifest.split(split).samples
    if not 0 <= index < total:
        raise ValueError(f"sample {index} does not exist: split {split!r} of {manifest.location} has {total} samples")
    spec = split_shards(manifest, split)[index // manifest.samples_per_shard]
    samples = read_shard(spec, SampleFormat.of(manifest))
    return tokenizer.decode(samples[index - spec.first_index])


def _tokenizer(spec: str | None, manifest: Manifest) -> Tokenizer:
    """The given tokenizer, or the manifest's own, after checking it is the one the shards were made with."""
    tokenizer = load_tokenizer(spec or manifest.tokenizer.spec)
    manifest.check_tokenizer(tokenizer.identity())
    return tokenizer


def _print_bad(url: str, reason: str) -> None:
    print(f"inspect: bad shard: {reason}", file=sys.stderr)


@quiet_on_broken_pipe
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools.inspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", type=Path, help="dataset directory or its manifest.json")
    parser.add_argument("--decode", type=int, metavar="K", help="print sample K of --split as text")
    parser.add_argument("--split", choices=SPLITS, default="train", help="split for --decode")
    parser.add_argument("--verify", action="store_true", help="check every shard against the manifest")
    parser.add_argument(
        "--skip-bad", action="store_true", help="with --verify: report all bad shards instead of stopping"
    )
    parser.add_argument(
        "--tokenizer", help="tokenizer to decode with / verify against (default for --decode: the manifest's)"
    )
    args = parser.parse_args(argv)
    try:
        manifest = load_manifest(args.dataset)
        print(describe(manifest))
        if args.decode is not None:
            text = decode_sample(manifest, args.split, args.decode, _tokenizer(args.tokenizer, manifest))
            print(f"--- {args.split} sample {args.decode} ---")
            print(text)
        if args.verify:
            identity = _tokenizer(args.tokenizer, manifest).identity() if args.tokenizer else None
            report = verify_dataset(manifest, skip_bad=args.skip_bad, tokenizer_identity=identity, on_bad=_print_bad)
            verdict = "OK" if report.ok else f"FAILED: {len(report.bad)} bad shards"
            print(f"verify: {report.shards_ok} shards, {report.samples_ok:,} samples intact; {verdict}")
            return 0 if report.ok else 1
    except (ValueError, FileNotFoundError, TokenizerUnavailableError) as exc:  # incl. ManifestError, ShardError
        print(f"inspect: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
