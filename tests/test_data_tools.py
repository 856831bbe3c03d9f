"""The data tools end to end: train-tokenizer -> prepare -> inspect, and the corpus builder.

The reference for every prepared dataset is an independent re-derivation:
the corpus tokenized document by document, EOS appended, routed by
``is_validation``, and concatenated.  Reproducibility claims (twice, 1 vs 2
workers, interrupted and resumed) are checked byte for byte over every file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_data_library import tiny_documents, write_parquet

from data_tools import inspect as inspect_tool
from data_tools import prepare as prepare_tool
from data_tools import train_tokenizer as train_tool
from data_tools.debian_package import PackageFiles
from data_tools.html_text import extract_main_text
from data_tools.make_corpus import SCHEMA, DocSource, source_table
from megatron_sffn.data.manifest import load_manifest
from megatron_sffn.data.packing import is_validation
from megatron_sffn.data.shard_verify import iter_checked_shards
from megatron_sffn.data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
CONTEXT = 16
PER_SHARD = 64
FRACTION = 0.2


def prepare_args(corpus: Path, tokenizer: Path, out: Path, *extra: str) -> list[str]:
    return [
        str(corpus),
        "--tokenizer",
        str(tokenizer),
        "--out",
        str(out),
        "--context-length",
        str(CONTEXT),
        "--samples-per-shard",
        str(PER_SHARD),
        "--validation-fraction",
        str(FRACTION),
        "--workers",
        "1",
        "--quiet",
        *extra,
    ]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return tiny_documents(400, seed=7)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, docs: list[str]) -> Path:
    """The documents spread over two parquet files and a JSONL file (read in sorted name order)."""
    root = tmp_path_factory.mktemp("corpus")
    write_parquet(root / "a.parquet", docs[:150], url=[f"https://example.org/{i}" for i in range(150)])
    write_parquet(root / "b.parquet", docs[150:300])
    (root / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[300:]), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    root = tmp_path_factory.mktemp("tok")
    for name in ("tokenizer.json", "again.json"):
        assert train_tool.main([str(corpus), "--vocab-size", "320", "--out", str(root / name), "--quiet"]) == 0
    assert (root / "tokenizer.json").read_bytes() == (root / "again.json").read_bytes(), "training is not deterministic"
    return root / "tokenizer.json"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, corpus: Path, tokenizer: Path) -> Path:
    out = tmp_path_factory.mktemp("ref") / "ds"
    assert prepare_tool.main(prepare_args(corpus, tokenizer, out)) == 0
    return out


# ---------------------------------------------------------------- prepare: content


def test_prepared_stream_is_the_documents_each_followed_by_eos(
    reference: Path, docs: list[str], tokenizer: Path
) -> None:
    tok = load_tokenizer(tokenizer)
    manifest = load_manifest(reference)
    for split in ("train", "validation"):
        mine = [d for d in docs if is_validation(d, FRACTION, 0) == (split == "validation")]
        expected = np.concatenate([np.array(ids + [tok.eos_id]) for ids in tok.encode_batch(mine)])
        stream = np.concatenate([s.ravel() for _, s in iter_checked_shards(manifest, split)])
        stats = manifest.statistics[split]
        assert stats["documents"] == len(mine) and stats["document_tokens"] == len(expected)
        assert len(stream) == manifest.split(split).tokens == len(expected) - stats["discarded_tail_tokens"]
        assert 0 <= stats["discarded_tail_tokens"] < CONTEXT + 1
        np.testing.assert_array_equal(stream, expected[: len(stream)])
        # Every complete EOS-terminated segment decodes to exactly its document.
        ends = np.flatnonzero(stream == tok.eos_id)
        segments = np.split(stream[: ends[-1]], ends[:-1] + 1)
        assert [tok.decode(s[s != tok.eos_id]) for s in segments] == mine[: len(segments)]
        assert len(ends) == len(segments) >= len(mine) - 1


def test_split_follows_the_document_hash_near_the_requested_fraction(reference: Path, docs: list[str]) -> None:
    stats = load_manifest(reference).statistics
    assert stats["validation"]["documents"] == sum(is_validation(d, FRACTION, 0) for d in docs)
    # Binomial(400, 0.2): standard deviation 8, so +-32 is 4 sigma.
    assert abs(stats["validation"]["documents"] - FRACTION * len(docs)) < 32
    assert stats["train"]["documents"] + stats["validation"]["documents"] == len(docs)


def test_manifest_records_inputs_tokenizer_and_settings(reference: Path, corpus: Path, tokenizer: Path) -> None:
    m = load_manifest(reference)
    assert [s.path for s in m.sources] == [str(corpus / n) for n in ("a.parquet", "b.parquet", "c.jsonl")]
    assert m.tokenizer.spec == str(tokenizer) and m.tokenizer.sha256 == load_tokenizer(tokenizer).sha256
    assert m.settings["validation_fraction"] == FRACTION and m.settings["seed"] == 0
    assert m.context_length == CONTEXT and m.samples_per_shard == PER_SHARD and m.token_dtype == "uint16"
    assert len(m.splits["train"].shards) >= 3 and not (reference / ".prepare-state").exists()


# ---------------------------------------------------------------- prepare: reproducibility


def test_prepared_twice_and_with_two_workers_is_byte_identical(
    reference: Path, corpus: Path, tokenizer: Path, tmp_path: Path
) -> None:
    assert prepare_tool.main(prepare_args(corpus, tokenizer, tmp_path / "again")) == 0
    assert tree_bytes(tmp_path / "again") == tree_bytes(reference)
    args = prepare_args(corpus, tokenizer, tmp_path / "two")
    args[args.index("--workers") + 1] = "2"
    assert prepare_tool.main(args + ["--batch-documents", "7"]) == 0
    assert tree_bytes(tmp_path / "two") == tree_bytes(reference)


def test_rerunning_a_finished_job_changes_nothing(
    reference: Path, corpus: Path, tokenizer: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "ds"
    shutil.copytree(reference, out)
    assert prepare_tool.main(prepare_args(corpus, tokenizer, out)) == 0
    assert "already complete" in capsys.readouterr().err
    assert tree_bytes(out) == tree_bytes(reference)
    assert prepare_tool.main(prepare_args(corpus, tokenizer, out, "--seed", "1")) == 1
    assert "already holds a finished dataset with different settings" in capsys.readouterr().err
    assert tree_bytes(out) == tree_bytes(reference)


def test_interrupted_prepare_resumes_to_the_identical_dataset(
    reference: Path, corpus: Path, tokenizer: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ds"
    env = dict(os.environ, **{prepare_tool.PAUSE_ENV: "0.5"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_tools.prepare", *prepare_args(corpus, tokenizer, out)],
        cwd=REPO,
        env=env,
        stderr=subprocess.PIPE,
    )
    state = out / ".prepare-state" / "state.json"
    try:
        deadline = time.monotonic() + 120
        while not (state.is_file() and "train-000000.tar" in state.read_text()):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "prepare wrote no shard within 120 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert not (out / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="no manifest"):
        load_manifest(out)
    assert 1 <= len(list((out / "train").glob("*.tar"))) < len(load_manifest(reference).splits["train"].shards)
    assert prepare_tool.main(prepare_args(corpus, tokenizer, out)) == 0
    assert tree_bytes(out) == tree_bytes(reference)


# ---------------------------------------------------------------- prepare: bad input


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jsonl", b"", r"the corpus is empty: .*empty\.jsonl hold no documents"),
        ("latin1.txt", b"plain line\nfa\xe7ade\n", r"latin1\.txt: line 2, byte 13: byte b'\\xe7' is not valid UTF-8"),
        (
            "latin1.jsonl",
            b'{"text": "ok"}\n{"text": "fa\xe7ade"}\n',
            r"latin1\.jsonl: line 2, byte 12: .*not valid UTF-8",
        ),
        ("short.jsonl", b'{"text": "hi"}\n', r"fewer than one sample of context_length \+ 1 = 17"),
    ],
)
def test_bad_corpus_stops_prepare_naming_the_file(
    tmp_path: Path, tokenizer: Path, capsys: pytest.CaptureFixture, name: str, content: bytes, message: str
) -> None:
    (tmp_path / name).write_bytes(content)
    assert prepare_tool.main(prepare_args(tmp_path / name, tokenizer, tmp_path / "out")) == 1
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_parquet_without_content_column_stops_prepare(
    tmp_path: Path, tokenizer: Path, capsys: pytest.CaptureFixture
) -> None:
    pq.write_table(pa.table({"text": ["a document"]}), tmp_path / "web.parquet")
    assert prepare_tool.main(prepare_args(tmp_path / "web.parquet", tokenizer, tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert "web.parquet: no column 'content' (columns: text)" in err and "RefinedWeb-format" in err
    # The same file is usable once the right column is named.
    assert (
        prepare_tool.main(prepare_args(tmp_path / "web.parquet", tokenizer, tmp_path / "out", "--text-key", "text"))
        == 1
    )
    assert "fewer than one sample" in capsys.readouterr().err


# ---------------------------------------------------------------- inspect


def test_inspect_describes_and_decodes(reference: Path, tokenizer: Path, capsys: pytest.CaptureFixture) -> None:
    manifest = load_manifest(reference)
    k = PER_SHARD + 9  # row 9 of the second shard
    assert inspect_tool.main([str(reference), "--decode", str(k), "--split", "validation"]) == 0
    out = capsys.readouterr().out
    assert f"validation     {manifest.split('validation').samples:,} samples" in out
    _, second_shard = list(iter_checked_shards(manifest, "validation"))[1]
    expected = load_tokenizer(tokenizer).decode(second_shard[9])
    assert out.endswith(f"--- validation sample {k} ---\n{expected}\n")
    assert inspect_tool.main([str(reference), "--decode", "100000"]) == 1
    assert "sample 100000 does not exist" in capsys.readouterr().err


def test_inspect_verify_passes_on_a_good_dataset(
    reference: Path, tokenizer: Path, capsys: pytest.CaptureFixture
) -> None:
    assert inspect_tool.main([str(reference), "--verify", "--tokenizer", str(tokenizer)]) == 0
    m = load_manifest(reference)
    total = m.split("train").samples + m.split("validation").samples
    assert f"{total:,} samples intact; OK" in capsys.readouterr().out


def test_inspect_verify_fails_on_tampered_shards(
    reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "ds"
    shutil.copytree(reference, out)
    truncated = out / "train" / "train-000001.tar"
    truncated.write_bytes(truncated.read_bytes()[:700])
    (out / "validation" / "validation-000000.tar").unlink()
    assert inspect_tool.main([str(out), "--verify"]) == 1
    assert "train-000001.tar" in capsys.readouterr().err
    assert inspect_tool.main([str(out), "--verify", "--skip-bad"]) == 1
    captured = capsys.readouterr()
    assert "FAILED: 2 bad shards" in captured.out
    assert "validation-000000.tar: shard is missing" in captured.err and "train-000001.tar" in captured.err


def test_inspect_verify_rejects_another_tokenizer(
    reference: Path, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    other = tmp_path / "other.json"
    assert train_tool.main([str(corpus), "--vocab-size", "300", "--out", str(other), "--quiet"]) == 0
    assert inspect_tool.main([str(reference), "--verify", "--tokenizer", str(other)]) == 1
    assert "does not match the manifest's tokenizer" in capsys.readouterr().err


def test_train_tokenizer_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty.txt").write_text("")
    assert train_tool.main([str(tmp_path / "empty.txt"), "--out", str(tmp_path / "t.json"), "--quiet"]) == 1
    assert "the corpus is empty" in capsys.readouterr().err
    (tmp_path / "a.txt").write_text("some text")
    assert train_tool.main([str(tmp_path / "a.txt"), "--vocab-size", "100", "--out", str(tmp_path / "t.json")]) == 1
    assert "expected at least 257" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


# ---------------------------------------------------------------- embedded corpus builder

PAGE = """<html><head><title>T</title><script>var x = 1;</script></head><body>
<nav>Menu <a href="/">Home</a></nav>
<div class="document"><div class="body" role="main">
<section><h1>Title<a class="headerlink" href="#t">¶</a></h1>
<p>First   paragraph with <code>code</code>
spanning lines.</p>
<div class="highlight"><pre>def f():

    return 1
</pre></div>
<ul><li>item one</li><li>item &amp; two</li></ul>
</section></div></div>
<footer>Copyright notice</footer></body></html>"""


def test_html_main_text_keeps_content_and_code_layout_only() -> None:
    assert extract_main_text(PAGE) == (
        "Title\nFirst paragraph with code spanning lines.\ndef f():\n\n    return 1\nitem one\nitem & two"
    )
    assert extract_main_text("<html><body><p>no main element</p></body></html>") == ""


def test_doc_pages_become_refinedweb_rows(tmp_path: Path) -> None:
    html = tmp_path / "pkg" / "usr/share/doc/demo/html"
    for rel in ("index.html", "guide/intro.html", "genindex.html", "_static/x.html", "empty.html"):
        (html / rel).parent.mkdir(parents=True, exist_ok=True)
        (html / rel).write_text(PAGE if rel != "empty.html" else "<div role='main'> </div>", encoding="utf-8")
    source = DocSource("demo-doc", "usr/share/doc/demo/html", "https://docs.example.org/", ("role", "main"), True)
    files = PackageFiles("demo-doc", "1.0-1", tmp_path / "pkg")
    table, empty = source_table(source, files, progress=False)
    assert table.schema == SCHEMA and empty == ["demo-doc:empty.html"]
    assert table.column("segment").to_pylist() == ["guide/intro.html", "index.html"]
    assert table.column("url").to_pylist() == ["https://docs.example.org/guide/intro/", "https://docs.example.org/"]
    assert set(table.column("dump").to_pylist()) == {"debian:demo-doc=1.0-1"}
    assert table.column("content").to_pylist()[0].startswith("Title\nFirst paragraph")
    again, _ = source_table(source, files, progress=False)
    assert again.equals(table)
    plain = DocSource("demo-doc", "usr/share/doc/demo/html", "https://docs.example.org/3/", ("role", "main"), False)
    assert plain.url("guide/intro.html") == "https://docs.example.org/3/guide/intro.html"
