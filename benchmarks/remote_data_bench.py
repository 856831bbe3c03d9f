"""Raw-mode loader throughput from a local HTTP server (range requests) against the same local files.

    python benchmarks/remote_data_bench.py                 # synthetic parquet corpus, 3 alternating repeats

Both cases run the on-the-fly loader in this process (one reader, i.e. one
loader worker) over the same parquet files, timed in steady state with
``data_bench.time_rounds``; they alternate ``--repeats`` times and the
medians are compared, so the ratio is robust to a busy machine.  The HTTP
case also reports the bytes the server sent per training token (range reads
that fetched whole files per row group would show as a large multiple of
the corpus's bytes per token).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread: a per-worker figure

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from data_bench import synthetic_corpus, time_rounds  # noqa: E402
from http_range_server import RangeServer  # noqa: E402

from data_tools.train_tokenizer import train_tokenizer  # noqa: E402
from megatron_sffn.data.on_the_fly import DEFAULT_SHUFFLE_WINDOW, build_text_train_loader, text_settings  # noqa: E402
from megatron_sffn.data.streaming import StreamLayout  # noqa: E402
from megatron_sffn.data.text_sources import expand_inputs, iter_documents  # noqa: E402
from megatron_sffn.data.tokenizer import load_tokenizer  # noqa: E402


def parquet_corpus(root: Path, documents: int, row_group: int, files: int) -> list[Path]:
    """The synthetic documents in ``files`` parquet files of consecutive documents."""
    texts = [doc.text for doc in iter_documents(synthetic_corpus(root / "jsonl", documents))]
    (root / "parquet").mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(files):
        path = root / "parquet" / f"part-{i}.parquet"
        part = texts[i * len(texts) // files : (i + 1) * len(texts) // files]
        pq.write_table(pa.table({"content": part}), path, row_group_size=row_group)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", type=int, default=2000)
    parser.add_argument("--row-group", type=int, default=128, help="parquet rows per row group")
    parser.add_argument("--context-length", type=int, default=1024)
    parser.add_argument("--lanes", type=int, default=4)
    parser.add_argument(
        "--files",
        type=int,
        default=4,
        help="parquet files; with fewer files than lanes several lanes download each file",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        files = parquet_corpus(scratch, args.documents, args.row_group, args.files)
        sources = expand_inputs([str(p) for p in files])
        tokenizer = str(train_tokenizer(sources, 4096, scratch / "tokenizer.json", progress=False))
        corpus_bytes = sum(p.stat().st_size for p in files)
        texts = [doc.text for doc in iter_documents(sources)]
        corpus_tokens = sum(len(ids) + 1 for ids in load_tokenizer(tokenizer).encode_batch(texts))
        results: dict[str, list[float]] = {"local files": [], "local HTTP server": []}
        downloaded: list[float] = []
        with RangeServer(files[0].parent) as server:
            inputs = {"local files": [str(p) for p in files], "local HTTP server": [server.url(p.name) for p in files]}
            for repeat in range(args.repeats):
                for case, paths in inputs.items():
                    print(f"[remote_data_bench] repeat {repeat + 1}/{args.repeats}: {case}", file=sys.stderr)
                    before = server.bytes_sent
                    settings = text_settings(paths, tokenizer, args.context_length)
                    loader = build_text_train_loader(
                        settings, StreamLayout(micro_batch_size=args.micro_batch_size), lanes=args.lanes
                    )
                    tokens, seconds = time_rounds(
                        loader, args.lanes * DEFAULT_SHUFFLE_WINDOW, args.rounds, args.micro_batch_size
                    )
                    results[case].append(tokens / seconds)
                    if case == "local HTTP server":
                        # Everything the run downloaded (start-up included) over the tokens it trained on.
                        trained = (args.rounds + 2) * args.lanes * DEFAULT_SHUFFLE_WINDOW * args.context_length
                        downloaded.append((server.bytes_sent - before) / trained)
    local, http = (statistics.median(results[c]) for c in results)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(
        f"\nRaw-mode loader, one reader (= one worker), {args.files} files, {args.lanes} lanes, "
        f"context {args.context_length}, {os.cpu_count()} CPUs, "
        f"load average {' '.join(load)}\n"
    )
    print("| input | tokens/s per worker (median of %d) | vs local files |" % args.repeats)
    print("|---|---:|---:|")
    print(f"| local files | {local:,.0f} | 1.00 |")
    print(f"| local HTTP server (range reads) | {http:,.0f} | {http / local:.2f} |")
    print(
        f"\nbytes downloaded per trained token: {statistics.median(downloaded):.2f} "
        f"(the parquet files hold {corpus_bytes / corpus_tokens:.2f} bytes per token: {corpus_bytes:,} bytes, "
        f"{corpus_tokens:,} tokens)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
