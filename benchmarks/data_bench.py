"""Data pipeline throughput: ``prepare`` against bare tokenization, and the loaders.

    python benchmarks/data_bench.py                      # embedded corpus (data/corpus) if present
    python benchmarks/data_bench.py --json results.json --rounds 5

(a) ``prepare`` with one tokenizer worker against bare HF ``tokenizers``
    ``encode_batch`` over the same documents (already in memory, same batch
    size, one thread).  Both rates count the same tokens (document ids plus
    the EOS each document gets), so *overhead* = bare rate / prepare rate - 1
    is the share of time ``prepare`` spends beyond tokenizing: reading
    parquet, the split hash, packing, writing and hashing shards, progress.
    Both run in this one process on one thread, so they are timed in CPU
    seconds of this process (``time.process_time``), which other processes
    on a shared machine barely disturb; they alternate ``--repeats`` times
    and the medians are compared.
(b) The training loader over the shards that (a) wrote, per DataLoader
    worker (0 = in the training process, counted as one worker).
(c) The on-the-fly loader over the raw corpus, per worker.

Loaders produce in lumps (a lane reads a whole shard, or tokenizes a whole
shuffle window, when it first needs one), so (b) and (c) are timed in steady
state over whole *rounds*: ``lanes x samples_per_shard`` samples for shards,
``lanes x shuffle_window`` for text.  The clock starts when the first batch
of round 2 arrives (start-up and the first lump excluded) and stops when the
first batch of round ``2 + --rounds`` arrives.

Without ``data/corpus`` a synthetic corpus of random words is generated
(and, without ``data/tokenizer.json``, a tokenizer trained on it), so the
benchmark runs anywhere.  Shards are read from the local page cache; remote
storage adds its own latency, which DataLoader prefetching hides only when
the storage keeps up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread: a per-worker figure

import numpy as np  # noqa: E402

from data_tools.prepare import PrepareOptions, prepare  # noqa: E402
from megatron_sffn.data.loader import build_train_loader  # noqa: E402
from megatron_sffn.data.streaming import StreamLayout  # noqa: E402
from megatron_sffn.data.text_sources import SourceFile, expand_inputs, iter_documents  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_CORPUS = ROOT / "data" / "corpus"
EMBEDDED_TOKENIZER = ROOT / "data" / "tokenizer.json"
BATCH_DOCUMENTS = 64
PREPARE_OVERHEAD_LIMIT = 0.30
LOADER_TARGET_PER_WORKER = 400_000


@dataclass
class Row:
    part: str
    case: str
    workers: int
    tokens: int
    seconds: float
    clock: str  # "cpu" (this process's CPU time) or "wall"

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def per_worker(self) -> float:
        return self.tokens_per_s / max(self.workers, 1)


def synthetic_corpus(out: Path, documents: int, seed: int = 0) -> list[SourceFile]:
    """Random-word documents of varied length in two JSONL files (deterministic for ``seed``)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, size=rng.integers(2, 9))) for _ in range(5000)]
    zipf = 1.0 / np.arange(1, len(words) + 1)
    zipf /= zipf.sum()
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"synthetic-{i}.jsonl" for i in range(2)]
    for path in paths:
        with open(path, "w", encoding="utf-8") as f:
            for _ in range(documents // len(paths)):
                picked = rng.choice(len(words), size=int(rng.integers(50, 2000)), p=zipf)
                f.write(json.dumps({"text": " ".join(words[j] for j in picked) + "."}) + "\n")
    return expand_inputs([str(p) for p in paths])


def resolve_inputs(args: argparse.Namespace, scratch: Path) -> tuple[list[SourceFile], str, str]:
    """The corpus, the tokenizer spec, and a one-word description of where they came from."""
    if args.corpus is not None or EMBEDDED_CORPUS.is_dir():
        sources = expand_inputs([str(args.corpus or EMBEDDED_CORPUS)])
        origin = "corpus " + str(args.corpus or EMBEDDED_CORPUS.relative_to(ROOT))
    else:
        print(f"[data_bench] no {EMBEDDED_CORPUS}; generating a synthetic corpus", file=sys.stderr)
        sources = synthetic_corpus(scratch / "corpus", args.synthetic_documents)
        origin = f"synthetic corpus ({args.synthetic_documents} documents)"
    tokenizer = args.tokenizer or (str(EMBEDDED_TOKENIZER) if EMBEDDED_TOKENIZER.is_file() else None)
    if tokenizer is None:
        from data_tools.train_tokenizer import train_tokenizer

        print("[data_bench] no tokenizer given or embedded; training one on the corpus", file=sys.stderr)
        tokenizer = str(train_tokenizer(sources, 4096, scratch / "tokenizer.json", progress=True))
    return sources, tokenizer, origin


def bare_tokenizer_seconds(texts: list[str], tokenizer: str) -> tuple[int, float]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer)
    tok.encode_special_tokens = True  # as prepare's tokenizer does
    tokens = 0
    start = time.process_time()
    for i in range(0, len(texts), BATCH_DOCUMENTS):
        batch = tok.encode_batch(texts[i : i + BATCH_DOCUMENTS], add_special_tokens=False)
        tokens += sum(len(e.ids) + 1 for e in batch)  # + EOS, as prepare counts
    return tokens, time.process_time() - start


def prepare_seconds(
    sources: list[SourceFile], tokenizer: str, out: Path, args: argparse.Namespace
) -> tuple[int, float]:
    options = PrepareOptions(
        tokenizer=tokenizer,
        out=out,
        context_length=args.context_length,
        samples_per_shard=args.samples_per_shard,
        text_key=args.text_key,
        workers=1,
        batch_documents=BATCH_DOCUMENTS,
    )
    start = time.process_time()
    result = prepare(sources, options, progress=True)
    return result.tokens, time.process_time() - start


def bench_prepare(sources: list[SourceFile], tokenizer: str, scratch: Path, args: argparse.Namespace) -> list[Row]:
    """Bare tokenization and prepare, alternately; leaves the last prepared dataset in ``scratch/shards``."""
    texts = [doc.text for doc in iter_documents(sources, args.text_key)]
    bare, prepared = [], []
    for i in range(args.repeats):
        print(
            f"[data_bench] (a) round {i + 1}/{args.repeats}: bare tokenizers over {len(texts)} documents",
            file=sys.stderr,
        )
        bare.append(bare_tokenizer_seconds(texts, tokenizer))
        print(f"[data_bench] (a) round {i + 1}/{args.repeats}: prepare, 1 tokenizer worker", file=sys.stderr)
        out = scratch / "shards"
        if out.exists():
            shutil.rmtree(out)
        prepared.append(prepare_seconds(sources, tokenizer, out, args))
    return [
        Row("a", "bare tokenizers encode_batch", 1, bare[0][0], statistics.median(s for _, s in bare), "cpu"),
        Row("a", "data_tools.prepare", 1, prepared[0][0], statistics.median(s for _, s in prepared), "cpu"),
    ]


def time_rounds(loader, round_samples: int, rounds: int, micro_batch: int) -> tuple[int, float]:
    """Tokens and seconds between the first batches of round 2 and of round ``2 + rounds``."""
    if round_samples % micro_batch:
        raise ValueError(f"a round of {round_samples} samples is not a whole number of {micro_batch}-sample batches")
    batches = iter(loader)
    consumed = tokens = 0
    start = 0.0
    while consumed < (rounds + 1) * round_samples:
        batch = next(batches)
        if consumed == round_samples:
            start = time.perf_counter()
        if consumed >= round_samples:
            tokens += batch["tokens"].numel()
        consumed += micro_batch
    next(batches)  # the first batch of the following round closes the measured span
    elapsed = time.perf_counter() - start
    batches.close()
    return tokens, elapsed


def bench_loaders(dataset: Path, sources: list[SourceFile], tokenizer: str, args: argparse.Namespace) -> list[Row]:
    from megatron_sffn.data.on_the_fly import DEFAULT_SHUFFLE_WINDOW, build_text_train_loader, text_settings

    rows = []
    for workers in args.workers:
        print(f"[data_bench] (b) shard loader, {workers} workers", file=sys.stderr)
        layout = StreamLayout(micro_batch_size=args.micro_batch_size, num_workers=workers)
        loader = build_train_loader(dataset, layout, lanes=args.lanes)
        measured = time_rounds(loader, args.lanes * args.samples_per_shard, args.rounds, args.micro_batch_size)
        rows.append(Row("b", "shard loader", workers, *measured, "wall"))
    for workers in args.workers:
        print(f"[data_bench] (c) on-the-fly loader, {workers} workers", file=sys.stderr)
        settings = text_settings([s.path for s in sources], tokenizer, args.context_length, text_key=args.text_key)
        layout = StreamLayout(micro_batch_size=args.micro_batch_size, num_workers=workers)
        loader = build_text_train_loader(settings, layout, lanes=args.lanes)
        measured = time_rounds(loader, args.lanes * DEFAULT_SHUFFLE_WINDOW, args.rounds, args.micro_batch_size)
        rows.append(Row("c", "on-the-fly loader", workers, *measured, "wall"))
    return rows


def report(rows: list[Row], origin: str, args: argparse.Namespace) -> dict:
    print(f"\nData pipeline throughput ({origin}, context {args.context_length}, {os.cpu_count()} CPUs)\n")
    print("| part | case | workers | tokens | seconds (clock) | tokens/s | tokens/s per worker |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r.part} | {r.case} | {r.workers} | {r.tokens:,} | {r.seconds:.2f} ({r.clock}) "
            f"| {r.tokens_per_s:,.0f} | {r.per_worker:,.0f} |"
        )
    summary: dict = {
        "rows": [{**asdict(r), "tokens_per_s": r.tokens_per_s, "tokens_per_s_per_worker": r.per_worker} for r in rows],
        "corpus": origin,
        "context_length": args.context_length,
    }
    bare = next((r for r in rows if r.case.startswith("bare")), None)
    prep = next((r for r in rows if r.case == "data_tools.prepare"), None)
    if bare and prep:
        overhead = bare.tokens_per_s / prep.tokens_per_s - 1
        verdict = "within" if overhead <= PREPARE_OVERHEAD_LIMIT else "ABOVE"
        limit = f"{PREPARE_OVERHEAD_LIMIT:.0%}"
        print(f"\nprepare overhead over bare tokenization: {overhead:+.1%} ({verdict} the {limit} limit)")
        summary["prepare_overhead"] = overhead
    loader_rows = [r for r in rows if r.part == "b"]
    if loader_rows:
        worst = min(r.per_worker for r in loader_rows)
        verdict = "meets" if worst >= LOADER_TARGET_PER_WORKER else "MISSES"
        target = f"{LOADER_TARGET_PER_WORKER:,}"
        print(f"shard loader: slowest per-worker rate {worst:,.0f} tokens/s ({verdict} the {target} target)")
        summary["loader_min_tokens_per_s_per_worker"] = worst
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", help="corpus files/directory (default: data/corpus, else synthetic)")
    parser.add_argument("--tokenizer", help="tokenizer.json (default: data/tokenizer.json, else trained)")
    parser.add_argument("--text-key", default=None, help="parquet column / JSONL key holding the text")
    parser.add_argument("--context-length", type=int, default=1024)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--lanes", type=int, default=8)
    parser.add_argument("--samples-per-shard", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader worker counts to time")
    parser.add_argument("--rounds", type=int, default=3, help="steady-state rounds timed per loader case")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of bare tokenization and prepare")
    parser.add_argument("--synthetic-documents", type=int, default=2000)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="data_bench-") as tmp:
        scratch = Path(tmp)
        sources, tokenizer, origin = resolve_inputs(args, scratch)
        rows = bench_prepare(sources, tokenizer, scratch, args)
        rows += bench_loaders(scratch / "shards", sources, tokenizer, args)
        summary = report(rows, origin, args)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
