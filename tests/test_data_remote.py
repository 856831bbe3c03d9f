"""Remote parquet inputs over HTTP range requests, against a local server started here.

Remote raw mode must be exactly the local stream (also across resumes at other DP sizes, entering
parquet files at the resume's row group), survive dropped connections and 503s, name the URL on a
permanent failure, and ``prepare`` from URLs must write the bytes it writes from the local files.
"""

from __future__ import annotations

import json
import shutil

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from http_range_server import RangeServer
from test_loader import run_chain
from test_loader_on_the_fly import full_rows, stream

from data_tools.prepare import PrepareOptions, prepare
from megatron_sffn.data import remote
from megatron_sffn.data.input_list import INPUT_LIST_FILE, record_inputs, recorded_inputs
from megatron_sffn.data.on_the_fly import build_text_train_loader, text_settings
from megatron_sffn.data.streaming import StreamLayout
from megatron_sffn.data.text_sources import SourceError, expand_inputs, numbered_records
from tests.workers.train_checks import word_level_tokenizer

CONTEXT = 8
LANES = 4
WORDS = [f"w{i}" for i in range(200)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three parquet files in row groups of 8 documents, and a word-level tokenizer."""
    root = tmp_path_factory.mktemp("remote")
    rng = np.random.default_rng(11)
    for f in range(3):
        docs = [" ".join(rng.choice(WORDS, int(rng.integers(1, 25)))) for _ in range(40)]
        pq.write_table(
            pa.table({"content": docs, "url": [f"https://x/{i}" for i in range(40)]}),
            root / f"part-{f}.parquet",
            row_group_size=8,
        )
    return root, word_level_tokenizer(WORDS, root / "tokenizer.json")


@pytest.fixture()
def server(corpus, monkeypatch):
    monkeypatch.setattr(remote, "DEFAULT_RETRY", remote.RetryPolicy(attempts=5, first_delay=0.01, max_delay=0.05))
    with RangeServer(corpus[0]) as running:
        yield running


def names() -> list[str]:
    return [f"part-{f}.parquet" for f in range(3)]


def loader(files, tokenizer, layout: StreamLayout = StreamLayout(3), *, lanes: int = LANES, **settings):
    settings = text_settings(files, tokenizer, CONTEXT, **{"validation_fraction": 0.1, "shuffle_window": 5, **settings})
    return build_text_train_loader(settings, layout, lanes=lanes)


def test_remote_raw_mode_is_the_local_stream_and_resumes_across_dp_sizes(corpus, server):
    root, tokenizer = corpus
    local = [str(root / n) for n in names()]
    urls = [server.url(n) for n in names()]
    expected = stream(loader(local, tokenizer, StreamLayout(1)), 80)
    assert stream(loader(urls, tokenizer, StreamLayout(1)), 80) == expected

    hops = [(2, 0, 3, 4), (1, 2, 2, 6), (4, 1, 1, 4)]
    seen, states = run_chain(hops, lambda layout: loader(urls, tokenizer, layout), stream)
    assert seen == expected[: len(seen)]
    # The state names files and content, not where they are: a local run resumes from a remote one.
    resumed = loader(local, tokenizer, StreamLayout(1))
    resumed.load_state_dict(states[-1])
    assert stream(resumed, 4) == expected[len(seen) : len(seen) + 4]


def test_a_resume_enters_parquet_at_its_row_group(corpus, server):
    root, _ = corpus
    url = server.url(names()[0])
    source = expand_inputs([url])[0]
    assert [n for n, _ in numbered_records(source, first_document=0)] == list(range(40))
    numbers = [n for n, _ in numbered_records(source, first_document=27)]
    assert numbers == list(range(24, 40))  # row groups of 8: starts at the group holding document 27
    reads = [r for r in server.requests if r[0] == "GET"]
    assert reads and all(r[2] is not None for r in reads)  # only range requests, never the whole file


def test_transient_failures_are_retried_to_the_same_stream(corpus, server, caplog):
    root, tokenizer = corpus
    urls = [server.url(n) for n in names()]
    expected = stream(loader(urls, tokenizer), 80)  # more than an epoch: every file is opened again
    got, batches = [], iter(loader(urls, tokenizer))
    for i, batch in zip(range(80), batches):
        if i == 5:  # mid-epoch: the lanes' next file opens and range reads meet the failures
            for name in names():
                server.fail(name, ["503", "drop", "short", "503"])
        got += full_rows(batch)
    batches.close()
    assert got == expected
    assert server.pending_failures() == 0 and "retrying" in caplog.text


def test_permanent_failures_name_the_url(corpus, server):
    root, tokenizer = corpus
    missing = server.url("missing.parquet")
    with pytest.raises(ValueError, match=rf"{missing}: HTTP 404 Not Found \(not retried\)"):
        loader([missing, server.url(names()[0])], tokenizer, lanes=2)  # checked before any reading
    server.fail(names()[0], ["503"] * 10)
    with pytest.raises(SourceError, match=rf"{server.url(names()[0])}: HEAD failed after 5 attempts \(last: HTTP 503"):
        list(numbered_records(expand_inputs([server.url(names()[0])])[0]))


def test_skip_mode_leaves_out_an_unreadable_file_and_counts_it_at_any_layout(corpus, server, tmp_path, caplog):
    root, tokenizer = corpus
    files = [*names(), "part-9.parquet"]  # the server has no part-9: HTTP 404
    for name in names():
        shutil.copy(root / name, tmp_path / name)
    pq.write_table(pa.table({"content": pa.array([], pa.string())}), tmp_path / "part-9.parquet")
    # Reference: the same files with part-9 holding no documents.
    expected = stream(loader([str(tmp_path / n) for n in files], tokenizer, StreamLayout(1), lanes=2), 240)

    def build(layout):
        return loader([server.url(n) for n in files], tokenizer, layout, lanes=2, skip_bad_files=True)

    whole = build(StreamLayout(1))
    assert stream(whole, 240) == expected
    counted = whole.state_dict()["stats"]
    missing = server.url("part-9.parquet")
    assert list(counted["bad_shards"]) == [missing] and "HTTP 404" in counted["bad_shards"][missing]
    assert counted["bad_shard_reads"] >= 2  # once per lane-epoch reading it: 240 samples pass an epoch
    assert "skipping unreadable file" in caplog.text and missing in caplog.text

    seen, states = run_chain([(1, 0, 5, 20), (2, 1, 3, 10), (1, 2, 4, 20)], build, stream)
    assert seen == expected[: len(seen)] and len(seen) == 240
    assert states[-1]["stats"]["bad_shard_reads"] == counted["bad_shard_reads"]


def test_prepare_from_urls_writes_the_local_bytes(corpus, server, tmp_path):
    root, tokenizer = corpus
    options = dict(tokenizer=tokenizer, context_length=CONTEXT, samples_per_shard=16, validation_fraction=0.1)
    list_file = tmp_path / "urls.txt"
    list_file.write_text("".join(server.url(n) + "\n" for n in names()))
    prepare(expand_inputs([f"@{list_file}"]), PrepareOptions(out=tmp_path / "remote", **options), progress=False)
    prepare(expand_inputs([str(root / "*.parquet")]), PrepareOptions(out=tmp_path / "local", **options), progress=False)

    def shards(out):
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.tar"))}

    assert shards(tmp_path / "remote") == shards(tmp_path / "local") != {}
    remote_sources = json.loads((tmp_path / "remote" / "manifest.json").read_text())["sources"]
    assert [sorted(s) for s in remote_sources] == [["path", "signature", "size"]] * 3
    assert [s["size"] for s in remote_sources] == [(root / n).stat().st_size for n in names()]


def test_prepare_downloads_a_remote_file_once(server, tmp_path):
    """Hashing the whole file for the manifest would download it a second time."""
    rng = np.random.default_rng(3)
    docs = [" ".join(rng.choice(WORDS, 50)) for _ in range(6000)]
    pq.write_table(pa.table({"content": docs}), server.root / "big.parquet", row_group_size=500)
    size = (server.root / "big.parquet").stat().st_size
    tokenizer = word_level_tokenizer(WORDS, tmp_path / "tokenizer.json")
    try:
        before = server.bytes_sent
        prepare(
            expand_inputs([server.url("big.parquet")]),
            PrepareOptions(tokenizer=tokenizer, out=tmp_path / "out", context_length=64, samples_per_shard=512),
            progress=False,
        )
        # Footer and signature reads cost a few 64 KiB blocks; a sha256 would cost the whole file again.
        assert size > 640 << 10 and server.bytes_sent - before < size + (384 << 10)
    finally:
        (server.root / "big.parquet").unlink()


def test_a_glob_is_resolved_once_per_run_and_a_resume_keeps_the_recorded_files(corpus, tmp_path, caplog):
    """Any fsspec filesystem (here the in-memory one) is globbed, read, and its listing pinned to the run."""
    root, tokenizer = corpus
    memory, prefix = fsspec.filesystem("memory"), f"/{tmp_path.name}"
    for name in names():
        memory.pipe(f"{prefix}/{name}", (root / name).read_bytes())
    pattern, run_dir = f"memory://{prefix}/*.parquet", tmp_path / "run"
    try:
        files = record_inputs([pattern], run_dir)
        assert [f.path for f in files] == [f"memory://{prefix}/{n}" for n in names()]
        assert (run_dir / INPUT_LIST_FILE).is_file()
        local = stream(loader([str(root / n) for n in names()], tokenizer, StreamLayout(1)), 40)
        assert stream(loader(files, tokenizer, StreamLayout(1)), 40) == local

        memory.pipe(f"{prefix}/part-00.parquet", (root / names()[0]).read_bytes())  # the listing changes
        memory.rm(f"{prefix}/{names()[2]}")
        assert record_inputs([pattern], run_dir) == files == recorded_inputs([pattern], run_dir)
        assert "now resolves to 3 files (new: memory:///" in caplog.text and "part-00.parquet" in caplog.text
        assert f"gone: memory://{prefix}/{names()[2]}" in caplog.text and "keeps the 3 files" in caplog.text
        with pytest.raises(ValueError, match=r"resolved from data.raw=.*but data.raw is now"):
            recorded_inputs([pattern, "more.parquet"], run_dir)
    finally:
        memory.rm(prefix, recursive=True)
