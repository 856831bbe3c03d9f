"""The shared data library: manifest validation, tokenizers, corpus readers, packing, shard writing/verification.

Everything is built here from scratch: a tiny corpus and a byte-level BPE
tokenizer trained on it, so no test depends on files or network access.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_sffn.data.manifest import (
    Manifest,
    ManifestError,
    TokenizerInfo,
    load_manifest,
    token_dtype_for_vocab,
)
from megatron_sffn.data.packing import TokenPacker, is_validation
from megatron_sffn.data.shard_verify import verify_dataset
from megatron_sffn.data.shard_writer import encode_shard
from megatron_sffn.data.tar_shards import ShardError
from megatron_sffn.data.text_sources import SourceError, expand_inputs, iter_documents
from megatron_sffn.data.tokenizer import TokenizerUnavailableError, load_tokenizer
from tests.prepared_data import write_prepared

WORDS = (
    "the model trains structured feedforward layers with low rank and block diagonal weights while "
    "attention stays dense; naïve café façade — 東京 données über"
).split()


def tiny_documents(count: int, seed: int = 0) -> list[str]:
    """Varied short documents, some multi-line and some with non-ASCII text."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(count):
        words = rng.choice(WORDS, size=int(rng.integers(3, 60)))
        sep = "\n" if i % 5 == 0 else " "
        docs.append(f"Document {i}:{sep}" + " ".join(words))
    return docs


def train_tiny_tokenizer(docs: list[str], path: Path, vocab_size: int = 400) -> Path:
    from data_tools.train_tokenizer import train_tokenizer

    corpus = path.with_suffix(".train.jsonl")
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return train_tokenizer(expand_inputs([str(corpus)]), vocab_size, path, progress=False)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_tokenizer(tiny_documents(300), tmp_path_factory.mktemp("tok") / "tokenizer.json")


# ---------------------------------------------------------------- tokenizer


def test_trained_tokenizer_round_trips_text_and_reports_its_identity(tokenizer_path: Path) -> None:
    tok = load_tokenizer(tokenizer_path)
    docs = tiny_documents(20, seed=1)
    ids = tok.encode_batch(docs)
    assert [tok.decode(i) for i in ids] == docs
    identity = tok.identity()
    assert identity["type"] == "hf-json" and identity["spec"] == str(tokenizer_path)
    assert identity["vocab_size"] == tok.vocab_size == 400
    assert tok.decode([tok.eos_id]) == "<|endoftext|>"
    assert identity["sha256"] == hashlib.sha256(tokenizer_path.read_bytes()).hexdigest()


def test_end_of_text_written_in_a_document_is_not_a_separator(tokenizer_path: Path) -> None:
    tok = load_tokenizer(tokenizer_path)
    ids = tok.encode_batch(["before <|endoftext|> after"])[0]
    assert tok.eos_id not in ids
    assert tok.decode(ids) == "before <|endoftext|> after"


def test_tokenizer_spec_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="missing/tokenizer.json"):
        load_tokenizer(tmp_path / "missing" / "tokenizer.json")
    with pytest.raises(ValueError, match="neither an existing tokenizer.json path nor a tiktoken encoding"):
        load_tokenizer("no-such-encoding")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="bad.json: not a valid HF tokenizer.json"):
        load_tokenizer(bad)
    # An empty cache directory: the encoding must fail clearly instead of being downloaded.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    with pytest.raises(TokenizerUnavailableError, match="'gpt2' is not in the local cache"):
        load_tokenizer("gpt2")


def test_sentencepiece_style_tokenizer_json_uses_its_end_of_sequence_token(tmp_path: Path) -> None:
    """LLaMA-format files (Metaspace pre-tokenizer, ``</s>``) load from their directory and add no BOS."""
    from tokenizers import SentencePieceBPETokenizer

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(
        tiny_documents(50), vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    sp.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert tok.eos_id == 2 and tok.identity()["spec"] == str(tmp_path)
    ids = tok.encode_batch(["the model trains"])[0]
    assert 1 not in ids and tok.decode(ids) == "the model trains"


def test_tiktoken_encoding_is_wrapped_and_hashed_by_definition(monkeypatch: pytest.MonkeyPatch) -> None:
    import tiktoken

    def toy(special: int) -> tiktoken.Encoding:
        ranks = {bytes([i]): i for i in range(256)}
        return tiktoken.Encoding(
            "toy", pat_str=r"\S+|\s+", mergeable_ranks=ranks, special_tokens={"<|endoftext|>": special}
        )

    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: toy(256))
    tok = load_tokenizer("gpt2")
    assert (tok.type, tok.vocab_size, tok.eos_id) == ("tiktoken", 257, 256)
    ids = tok.encode_batch(["hi <|endoftext|>"])[0]
    assert 256 not in ids and tok.decode(ids) == "hi <|endoftext|>"
    same = load_tokenizer("gpt2").sha256
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: toy(300))
    assert same == tok.sha256 != load_tokenizer("gpt2").sha256


# ---------------------------------------------------------------- text sources


def write_parquet(path: Path, texts: list[str | None], **extra: list) -> Path:
    pq.write_table(pa.table({"content": pa.array(texts, pa.string()), **extra}), path)
    return path


def test_parquet_documents_carry_refinedweb_metadata_and_inputs_are_sorted(tmp_path: Path) -> None:
    write_parquet(tmp_path / "b.parquet", ["second", "third"], url=["u2", "u3"], dump=["d", "d"])
    write_parquet(tmp_path / "a.parquet", ["first"], url=["u1"], dump=["d"])
    docs = list(iter_documents(expand_inputs([str(tmp_path / "*.parquet")])))
    assert [d.text for d in docs] == ["first", "second", "third"]
    assert docs[1].metadata == {"source": str(tmp_path / "b.parquet"), "row": 0, "url": "u2", "dump": "d"}


def test_jsonl_and_plain_text_inputs(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"body": "one"}\n\n{"body": "two"}\n', encoding="utf-8")
    (tmp_path / "b.txt").write_text("a whole\nfile\n", encoding="utf-8")
    (tmp_path / "c.txt").write_text("", encoding="utf-8")
    docs = list(iter_documents(expand_inputs([str(tmp_path)]), text_key="body"))
    assert [d.text for d in docs] == ["one", "two", "a whole\nfile\n"]
    assert docs[1].metadata["row"] == 2


def test_parquet_without_the_text_column_names_file_and_column(tmp_path: Path) -> None:
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"text": ["hello"]}), path)
    with pytest.raises(SourceError, match=r"x\.parquet: no column 'content' \(columns: text\)"):
        list(iter_documents(expand_inputs([str(path)])))


def test_null_text_names_the_row(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "n.parquet", ["ok", None])
    with pytest.raises(SourceError, match=r"n\.parquet: row 1: column 'content' is null"):
        list(iter_documents(expand_inputs([str(path)])))


@pytest.mark.parametrize("name", ["bad.txt", "bad.jsonl"])
def test_non_utf8_input_names_file_and_line(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    good = b'{"text": "fine"}\n' if name.endswith(".jsonl") else b"fine\n"
    path.write_bytes(good + b'{"text": "caf\xe9"}\n')
    with pytest.raises(SourceError, match=rf"{name}: line 2.*b'\\xe9' is not valid UTF-8"):
        list(iter_documents(expand_inputs([str(path)])))


def test_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "k.jsonl"
    path.write_text('{"text": "a"}\n{"other": "b"}\n', encoding="utf-8")
    with pytest.raises(SourceError, match=r"k\.jsonl: line 2: expected a JSON object with key 'text'"):
        list(iter_documents(expand_inputs([str(path)])))
    path.write_text('{"text": "a"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(SourceError, match=r"k\.jsonl: line 2: invalid JSON"):
        list(iter_documents(expand_inputs([str(path)])))


def test_input_pattern_matching_nothing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="matches no files"):
        expand_inputs([str(tmp_path / "*.parquet")])


# ---------------------------------------------------------------- packing and split


def test_validation_split_is_deterministic_seeded_and_near_the_fraction() -> None:
    docs = [f"document number {i}" for i in range(20000)]
    picked = [is_validation(d, 0.1, seed=3) for d in docs]
    assert picked == [is_validation(d, 0.1, seed=3) for d in docs]
    # Binomial(20000, 0.1): standard deviation ~42, so +-200 is ~5 sigma.
    assert abs(sum(picked) - 2000) < 200
    assert picked != [is_validation(d, 0.1, seed=4) for d in docs]
    assert not any(is_validation(d, 0.0, 0) for d in docs[:100])
    assert all(is_validation(d, 1.0, 0) for d in docs[:100])
    with pytest.raises(ValueError, match="validation fraction is 1.5"):
        is_validation("x", 1.5, 0)


def test_packer_appends_eos_and_chunks_the_concatenated_stream() -> None:
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 100, size=int(rng.integers(0, 30))).tolist() for _ in range(50)]
    packer = TokenPacker(sample_length=7, eos_id=0)
    taken = []
    for doc in docs:
        packer.add_document(doc)
        while (s := packer.take(3)) is not None:
            taken.append(s)
    rest, tail = packer.take_all()
    stream = np.concatenate([np.concatenate(taken).ravel(), rest.ravel()])
    expected = np.concatenate([np.array(d + [0]) for d in docs])
    assert tail == len(expected) - len(stream) < 7
    np.testing.assert_array_equal(stream, expected[: len(stream)])
    assert all(s.shape == (3, 7) for s in taken) and rest.shape[1] == 7


def test_packer_resumed_from_its_pending_tokens_continues_identically() -> None:
    docs = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11, 12, 13, 14], [15] * 9]
    whole = TokenPacker(4, 0)
    for d in docs:
        whole.add_document(d)
    expected, _ = whole.take_all()

    first = TokenPacker(4, 0)
    for d in docs[:2]:
        first.add_document(d)
    head = first.take(1)
    second = TokenPacker(4, 0, initial=first.pending())
    for d in docs[2:]:
        second.add_document(d)
    rest, _ = second.take_all()
    np.testing.assert_array_equal(np.concatenate([head, rest]), expected)


# ---------------------------------------------------------------- manifest and shards


def build_dataset(
    out: Path, vocab_size: int = 1000, context: int = 5, per_shard: int = 4, counts: dict[str, int] | None = None
) -> Manifest:
    """A small dataset written with the shard writer, sample i of a split starting with token i."""
    counts = counts or {"train": 10, "validation": 3}
    splits = {name: (np.arange(total)[:, None] + np.arange(context + 1)) % vocab_size for name, total in counts.items()}
    write_prepared(
        out,
        splits,
        context_length=context,
        per_shard=per_shard,
        tokenizer=TokenizerInfo("tok.json", "hf-json", vocab_size, 0, "ab" * 32),
        settings={"validation_fraction": 0.2, "seed": 0},
        created_by="test",
    )
    return load_manifest(out)


def test_manifest_round_trips_and_names_shards_relative_to_itself(tmp_path: Path) -> None:
    m = build_dataset(tmp_path)
    assert m.location == tmp_path / "manifest.json"
    assert m.token_dtype == "uint16" and m.sample_length == 6
    assert m.shard_locations("train") == [str(tmp_path / f"train/train-00000{i}.tar") for i in range(3)]
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert set(raw) >= {
        "format",
        "context_length",
        "sample_length",
        "token_dtype",
        "samples_per_shard",
        "tokenizer",
        "splits",
        "sources",
        "settings",
        "created_by",
    }
    assert raw["splits"]["train"]["shards"][2] == dataclasses.asdict(m.splits["train"].shards[2])
    assert token_dtype_for_vocab(65535) == "uint16" and token_dtype_for_vocab(65536) == "uint32"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.pop("context_length"), r"key 'context_length' is missing"),
        (lambda r: r.update(format="other/v0"), r"key 'format' is 'other/v0', expected 'megatron-sffn/shards-v1'"),
        (lambda r: r.update(sample_length=99), r"key 'sample_length' is 99, expected context_length \+ 1 = 6"),
        (
            lambda r: r["tokenizer"].update(vocab_size="big"),
            r"key 'tokenizer.vocab_size' is 'big', expected a JSON int",
        ),
        (
            lambda r: r["splits"]["train"]["shards"][0].update(samples=3, tokens=18),
            r"key 'splits.train.shards\[0\].samples' is 3, expected exactly samples_per_shard=4",
        ),
        (
            lambda r: r["splits"]["validation"].update(samples=4),
            r"key 'splits.validation.samples' is 4, expected the sum",
        ),
        (lambda r: r["splits"].pop("validation"), r"key 'splits.validation' is missing"),
        (lambda r: r.update(token_dtype="int8"), r"key 'token_dtype' is 'int8'"),
        (
            lambda r: r.update(sources=[{"path": "https://x/a.parquet", "size": 1}]),
            r"key 'sources\[0\]' must have exactly one of sha256 \(a local file\) or signature \(a URL\)",
        ),
    ],
)
def test_invalid_manifest_names_file_and_key(tmp_path: Path, edit, message: str) -> None:
    build_dataset(tmp_path)
    path = tmp_path / "manifest.json"
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=rf"{path}: {message}"):
        load_manifest(tmp_path)


def test_missing_manifest_means_unfinished_dataset(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no manifest"):
        load_manifest(tmp_path)


def test_shards_are_reproducible_webdataset_tars(tmp_path: Path) -> None:
    rows = np.arange(12).reshape(2, 6)
    data = encode_shard(rows, 40, "uint16")
    assert data == encode_shard(rows, 40, "uint16")
    path = tmp_path / "s.tar"
    path.write_bytes(data)
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["0000000040.tokens.u16", "0000000041.tokens.u16"]
        assert all(m.mtime == 0 and m.uid == 0 and m.uname == "sffn" for m in members)
        np.testing.assert_array_equal(np.frombuffer(tar.extractfile(members[1]).read(), "<u2"), rows[1])
    with pytest.raises(ValueError, match="does not fit uint16"):
        encode_shard(np.array([[70000, 1]]), 0, "uint16")


def test_verify_accepts_an_intact_dataset_and_checks_the_tokenizer(tmp_path: Path) -> None:
    m = build_dataset(tmp_path)
    report = verify_dataset(m, tokenizer_identity=dataclasses.asdict(m.tokenizer))
    assert report.ok and report.shards_ok == 4 and report.samples_ok == 13
    other = dict(dataclasses.asdict(m.tokenizer), sha256="cd" * 32, spec="other.json")
    with pytest.raises(ManifestError, match=r"tokenizer 'other.json' does not match .*tokenizer.sha256"):
        verify_dataset(m, tokenizer_identity=other)


def damage_truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def damage_flip_payload_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[512] ^= 0xFF  # first byte of the first sample's tokens
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (Path.unlink, r"train-000001\.tar: shard is missing"),
        (damage_truncate, r"train-000001\.tar: (unreadable tar stream|holds \d+ samples)"),
        (damage_flip_payload_byte, r"train-000001\.tar: (sha256 is|sample 0000000004 holds token id)"),
        (lambda p: p.write_bytes(b"not a tar at all" * 100), r"train-000001\.tar: unreadable tar stream"),
    ],
)
def test_damaged_shard_stops_verification_or_is_skipped_and_counted(tmp_path: Path, damage, message: str) -> None:
    m = build_dataset(tmp_path)
    damage(tmp_path / "train" / "train-000001.tar")
    with pytest.raises(ShardError, match=message):
        verify_dataset(m)
    report = verify_dataset(m, skip_bad=True)
    assert not report.ok and len(report.bad) == 1 and report.bad[0][0].endswith("train-000001.tar")
    assert report.shards_ok == 3 and report.samples_ok == 13 - 4


def test_sample_of_wrong_length_is_named(tmp_path: Path) -> None:
    m = build_dataset(tmp_path)
    shard = m.splits["validation"].shards[0]
    data = encode_shard(np.zeros((3, 5), dtype=np.int64), 0, "uint16")  # 5 tokens, expected 6
    (tmp_path / shard.path).write_bytes(data)
    # Give the manifest the new hash so the length check, not the hash, is what catches it.
    raw = json.loads((tmp_path / "manifest.json").read_text())
    raw["splits"]["validation"]["shards"][0]["sha256"] = hashlib.sha256(data).hexdigest()
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(
        ShardError, match=r"validation-000000\.tar: sample 0000000000 has 10 bytes \(5 tokens\), expected 6"
    ):
        verify_dataset(load_manifest(tmp_path))
