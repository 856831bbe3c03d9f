"""Hostile corpora: undecodable documents, lone surrogates, files named twice, rewritten inputs.

Every bad document is either a clear error naming file, row or line and column
(the default) or, opted in, left out and counted; a prepare or raw-mode stream
that skips them equals the one over the same corpus without them.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_data_library import tiny_documents, train_tiny_tokenizer

from data_tools import prepare as prepare_tool
from data_tools import train_tokenizer as train_tool
from megatron_sffn.data.manifest import load_manifest
from megatron_sffn.data.on_the_fly import build_text_train_loader, text_settings
from megatron_sffn.data.streaming import StreamLayout
from megatron_sffn.data.text_sources import SkippedDocuments, SourceError, expand_inputs, iter_documents

CONTEXT = 16
BAD_TEXT = "caf\udce9 \ud800"  # written as UTF-8 with surrogates: not valid UTF-8 for a reader


def parquet_with_raw_bytes(path: Path, texts: list[bytes], urls: list[bytes]) -> Path:
    """Parquet whose string columns hold exactly these bytes, valid UTF-8 or not (as a hostile writer leaves them)."""
    as_string = lambda values: pa.array(values, pa.binary()).view(pa.string())  # noqa: E731
    pq.write_table(pa.table({"content": as_string(texts), "url": as_string(urls)}), path, compression="none")
    return path


def encoded(text: str) -> bytes:
    return text.encode("utf-8", errors="surrogatepass")


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return tiny_documents(60, seed=3)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, docs) -> Path:
    return train_tiny_tokenizer(docs, tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, docs) -> dict[str, Path]:
    """The same corpus three ways: clean, as parquet with 2 undecodable rows and a bad url, as JSONL with
    2 lone surrogates."""
    root = tmp_path_factory.mktemp("hostile")
    bad_rows = {7: encoded(BAD_TEXT), 31: b"\xff\xfe broken"}
    texts = [bad_rows.get(i, encoded(d)) for i, d in enumerate(docs)]
    urls = [b"https://x/\xed\xa0\x80" if i == 3 else b"https://x/%d" % i for i in range(len(docs))]
    clean_docs = [d for i, d in enumerate(docs) if i not in bad_rows]
    clean = root / "clean"
    clean.mkdir()
    pq.write_table(pa.table({"content": clean_docs}), clean / "web.parquet", compression="none")
    jsonl = root / "jsonl" / "web.jsonl"
    jsonl.parent.mkdir()
    lines = [json.dumps({"text": "\ud800 lone" if i in bad_rows else d}) for i, d in enumerate(docs)]
    jsonl.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "parquet").mkdir()
    parquet = parquet_with_raw_bytes(root / "parquet" / "web.parquet", texts, urls)
    return {"clean": clean / "web.parquet", "parquet": parquet, "jsonl": jsonl}


def test_only_the_text_column_must_decode_and_a_bad_row_is_named(hostile):
    path = str(hostile["parquet"])
    with pytest.raises(
        SourceError,
        match=rf"{re.escape(path)}: row 7: column 'content', byte 3: byte b'\\xed' "
        r"is not valid UTF-8.*--bad-documents skip",
    ):
        list(iter_documents(expand_inputs([path])))
    skipped = SkippedDocuments()
    docs = list(iter_documents(expand_inputs([path]), bad_documents="skip", on_bad=skipped))
    clean = list(iter_documents(expand_inputs([str(hostile["clean"])])))
    assert [d.text for d in docs] == [d.text for d in clean]  # the bad url (row 3) stops nothing
    assert docs[3].metadata["url"] == "https://x/\ufffd\ufffd\ufffd"
    assert skipped.count == 2 and "row 31: column 'content', byte 0: byte b'\\xff'" in skipped.examples[1]


def test_lone_surrogate_in_jsonl_is_named_by_line(hostile):
    path = str(hostile["jsonl"])
    with pytest.raises(SourceError, match=rf"{re.escape(path)}: line 8: key 'text' holds a lone surrogate U\+D800"):
        list(iter_documents(expand_inputs([path])))
    skipped = SkippedDocuments()
    assert len(list(iter_documents(expand_inputs([path]), bad_documents="skip", on_bad=skipped))) == 58
    assert skipped.count == 2


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
        "32",
        "--validation-fraction",
        "0.2",
        "--quiet",
        *extra,
    ]


def shard_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.tar"))}


@pytest.mark.parametrize(
    "kind, workers, where",
    [
        ("parquet", "1", r"web\.parquet: row 7: column 'content', byte 3: byte b'\\xed' is not valid UTF-8"),
        ("jsonl", "1", r"web\.jsonl: line 8: key 'text' holds a lone surrogate U\+D800 at character 0"),
        ("jsonl", "2", r"web\.jsonl: line 8: key 'text' holds a lone surrogate"),
    ],
    ids=["parquet", "jsonl-1-worker", "jsonl-2-workers"],
)
def test_prepare_names_the_bad_document_or_skips_and_counts_it(
    tmp_path, capsys, hostile, tokenizer, kind, workers, where
):
    corpus = hostile[kind]
    assert prepare_tool.main(prepare_args(corpus, tokenizer, tmp_path / "strict", "--workers", workers)) == 1
    assert re.search(where, capsys.readouterr().err)
    assert not (tmp_path / "strict" / "manifest.json").exists()

    assert (
        prepare_tool.main(
            prepare_args(corpus, tokenizer, tmp_path / "skip", "--workers", workers, "--bad-documents", "skip")
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "prepare: skipped 2 bad documents (first: " in err and re.search(where, err)
    manifest = load_manifest(tmp_path / "skip")
    assert manifest.statistics["skipped_documents"] == 2
    assert len(manifest.statistics["skipped_document_errors"]) == 2
    assert prepare_tool.main(prepare_args(hostile["clean"], tokenizer, tmp_path / "clean")) == 0
    assert shard_bytes(tmp_path / "skip") == shard_bytes(tmp_path / "clean")  # exactly the corpus without them


def test_resumed_prepare_still_counts_every_skipped_document(tmp_path, hostile, tokenizer):
    """Both bad rows lie before the checkpoint the resumed run starts from; they are counted all the same."""
    options = prepare_tool.PrepareOptions(
        tokenizer=str(tokenizer),
        out=tmp_path / "out",
        context_length=CONTEXT,
        samples_per_shard=4,
        validation_fraction=0.2,
        bad_documents="skip",
    )
    sources = expand_inputs([str(hostile["jsonl"])])
    original = prepare_tool._SplitWriter._write_shard

    def stop_after_some_shards(self, split, samples):
        if self.state.documents_done >= 45:
            raise KeyboardInterrupt
        original(self, split, samples)

    prepare_tool._SplitWriter._write_shard = stop_after_some_shards
    try:
        with pytest.raises(KeyboardInterrupt):
            prepare_tool.prepare(sources, options, progress=False)
    finally:
        prepare_tool._SplitWriter._write_shard = original
    done = json.loads((tmp_path / "out/.prepare-state/state.json").read_text())["documents_done"]
    assert done > 31  # past both bad rows
    result = prepare_tool.prepare(sources, options, progress=False)
    assert result.skipped.count == 2 and result.manifest.statistics["skipped_documents"] == 2


def test_train_tokenizer_names_or_skips_bad_documents(tmp_path, capsys, hostile):
    args = [str(hostile["parquet"]), "--vocab-size", "300", "--out", str(tmp_path / "tok.json"), "--quiet"]
    assert train_tool.main(args) == 1
    assert "web.parquet: row 7: column 'content'" in capsys.readouterr().err
    assert train_tool.main([*args, "--bad-documents", "skip"]) == 0
    assert "train-tokenizer: skipped 2 bad documents" in capsys.readouterr().err
    assert (tmp_path / "tok.json").is_file()


def raw_stream(
    files: list[str], tokenizer: Path, samples: int, num_workers: int = 0, **settings
) -> tuple[list[list[int]], object]:
    settings = text_settings(files, str(tokenizer), CONTEXT, validation_fraction=0.2, shuffle_window=3, **settings)
    loader = build_text_train_loader(settings, StreamLayout(micro_batch_size=4, num_workers=num_workers), lanes=2)
    rows, it = [], iter(loader)
    while len(rows) < samples:
        rows += next(it)["tokens"].tolist()
    it.close()
    return rows, loader


@pytest.mark.parametrize("num_workers", [0, 2])
def test_raw_mode_names_or_skips_and_counts_bad_documents(hostile, tokenizer, num_workers):
    """Two files >= two lanes: each lane reads whole files, so skipping equals leaving the rows out."""
    files = [str(hostile["parquet"]), str(hostile["jsonl"])]
    with pytest.raises(
        SourceError,
        match=r"(row 7: column 'content'|line 8: key 'text' holds a lone surrogate)"
        r".*data\.bad_documents=skip",
    ):
        raw_stream(files, tokenizer, 8, num_workers=num_workers)
    clean_jsonl = hostile["jsonl"].parent / "clean.jsonl"
    clean_jsonl.write_text("".join(line for line in hostile["jsonl"].open() if "\\ud800" not in line))
    samples = 120  # more than an epoch of both lanes
    got, loader = raw_stream(files, tokenizer, samples, num_workers=num_workers, bad_documents="skip")
    expected, _ = raw_stream([str(hostile["clean"]), str(clean_jsonl)], tokenizer, samples)
    assert got == expected
    assert loader.stats.skipped_documents >= 4  # both lanes crossed both of their bad documents
    assert loader.state_dict()["stats"]["skipped_documents"] == loader.stats.skipped_documents


def test_a_file_named_twice_is_read_once_and_reported(tmp_path, monkeypatch, caplog):
    data = tmp_path / "dir"
    data.mkdir()
    pq.write_table(pa.table({"content": [f"doc {i}" for i in range(40)]}), data / "a.parquet")
    (data / "b.jsonl").write_text('{"text": "x"}\n')
    os.symlink(data / "a.parquet", tmp_path / "link.parquet")
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="megatron_sffn.data.text_sources"):
        sources = expand_inputs(["dir/a.parquet", "./dir/a.parquet", "dir", "dir//a.parquet", "link.parquet"])
    assert [s.path for s in sources] == ["./dir/a.parquet", "dir/b.jsonl"]
    assert len(list(iter_documents(sources))) == 41
    warned = " ".join(r.getMessage() for r in caplog.records)
    for name in ("dir/a.parquet", "dir//a.parquet", "link.parquet"):
        assert name in warned
    assert "read once" in warned


def stream_state(files: list[str], tokenizer: Path) -> dict:
    _, loader = raw_stream(files, tokenizer, 8)
    return loader.state_dict()


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_raw_mode_resume_refuses_a_same_size_rewrite(tmp_path, tokenizer, docs, kind):
    path = tmp_path / f"corpus.{kind}"

    def write(texts: list[str]) -> None:
        if kind == "jsonl":
            path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        else:
            pq.write_table(
                pa.table({"content": texts}), path, compression="none", use_dictionary=False, write_statistics=False
            )

    write(docs)
    state = stream_state([str(path)], tokenizer)
    size = path.stat().st_size
    changed = list(docs)
    middle = len(docs) // 2
    changed[middle] = changed[middle][::-1]  # same length, other text, in the middle of the file
    write(changed)
    assert path.stat().st_size == size
    _, loader = raw_stream([str(path)], tokenizer, 0)
    with pytest.raises(ValueError, match=r"loader state key 'data' is '[0-9a-f]+', this loader has '[0-9a-f]+'"):
        loader.load_state_dict(state)
    write(docs)  # the original content is accepted again
    _, loader = raw_stream([str(path)], tokenizer, 0)
    loader.load_state_dict(state)
