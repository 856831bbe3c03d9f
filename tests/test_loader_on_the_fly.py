"""On-the-fly tokenization: the shard loader's guarantees over raw text, checked against ``prepare``.

The corpus is three small JSONL files (fewer files than lanes, so files are
split into document-stride units) and the tokenizer a word-level one built
here, so tokenization is instant and exact.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from test_loader import merge_ranks, run_chain

from data_tools.prepare import PrepareOptions, prepare
from megatron_sffn.data.manifest import load_manifest
from megatron_sffn.data.on_the_fly import (
    START,
    TextSource,
    build_text_train_loader,
    build_text_validation_loader,
    text_settings,
)
from megatron_sffn.data.streaming import StreamLayout, merge_states
from megatron_sffn.data.tar_shards import SampleFormat, read_shard, split_shards
from megatron_sffn.data.text_sources import expand_inputs
from tests.workers.train_checks import word_level_tokenizer

CONTEXT = 8
LANES = 4
FRACTION = 0.15  # of documents held out


def full_rows(batch) -> list[list[int]]:
    """Whole samples of a batch: the tokens plus the last label."""
    return np.concatenate([batch["tokens"].numpy(), batch["labels"][:, -1:].numpy()], axis=1).tolist()


def stream(loader, batches: int) -> list[list[int]]:
    """Samples of the next ``batches`` batches; stops the loader's workers after."""
    rows = []
    it = iter(loader)
    for _, batch in zip(range(batches), it):
        rows += full_rows(batch)
    it.close()
    return rows


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[list[str], str]:
    root = tmp_path_factory.mktemp("text")
    rng = np.random.default_rng(5)
    words = [f"w{i}" for i in range(300)]
    files = []
    for f in range(3):
        path = root / f"part-{f}.jsonl"
        with open(path, "w") as out:
            for _ in range(30):
                doc = " ".join(words[j] for j in rng.integers(0, len(words), rng.integers(1, 30)))
                out.write(json.dumps({"text": doc}) + "\n")
        files.append(str(path))
    return files, word_level_tokenizer(words, root / "tokenizer.json")


def text_loader(
    corpus,
    layout: StreamLayout = StreamLayout(3),
    *,
    files: list[str] | None = None,
    seed: int = 1234,
    lanes: int = LANES,
    **settings,
):
    """The corpus' stream (or that of ``files``); ``settings`` are ``TextSettings`` fields."""
    paths, tokenizer = corpus
    settings = text_settings(
        paths if files is None else files,
        tokenizer,
        CONTEXT,
        **{"validation_fraction": FRACTION, "shuffle_window": 5, **settings},
    )
    return build_text_train_loader(settings, layout, seed=seed, lanes=lanes)


def reference(corpus, samples: int, **options) -> list[list[int]]:
    return stream(text_loader(corpus, StreamLayout(1), **options), samples)


def test_each_epoch_reads_every_training_document_once(corpus):
    paths, tokenizer = corpus
    settings = text_settings(paths, tokenizer, CONTEXT, validation_fraction=FRACTION)
    source = TextSource(settings, seed=1234, lanes=LANES)
    assert len(source.units) == 6  # 3 files < 4 lanes: each file split in two by document stride
    training = Counter(
        (f, i)
        for f, path in enumerate(paths)
        for i, line in enumerate(open(path))
        if not settings.is_held_out(json.loads(line)["text"])
    )
    assert 0 < sum(training.values()) < 90  # some documents are held out
    for epoch in range(2):
        read = Counter()
        for lane in range(LANES):
            for doc in source.lane_documents(lane, START._replace(epoch=epoch)):
                if doc.at.epoch != epoch:
                    break
                read[(source.lane_units(lane, epoch)[doc.at.slot].file, doc.at.document)] += 1
        assert read == training


def test_one_lane_one_file_gives_prepares_samples(corpus, tmp_path):
    """With one lane and one file, the stream is prepare's train split, shuffled only within windows,
    and the held-out pass is prepare's validation split."""
    paths, tokenizer = corpus
    out = tmp_path / "prepared"
    options = PrepareOptions(
        tokenizer=tokenizer,
        out=out,
        context_length=CONTEXT,
        samples_per_shard=16,
        validation_fraction=FRACTION,
        split_seed=0,
    )
    prepare(expand_inputs(paths[:1]), options, progress=False)
    manifest = load_manifest(out)

    def split(name: str) -> list[list[int]]:
        return np.concatenate([read_shard(s, SampleFormat.of(manifest)) for s in split_shards(manifest, name)]).tolist()

    train = split("train")
    assert reference(corpus, len(train), files=paths[:1], lanes=1, shuffle_window=1) == train
    window = 5
    shuffled = reference(corpus, len(train) // window * window, files=paths[:1], lanes=1, shuffle_window=window)
    assert shuffled != train[: len(shuffled)]
    for w in range(0, len(shuffled), window):
        assert sorted(shuffled[w : w + window]) == sorted(train[w : w + window])

    settings = text_settings(paths[:1], tokenizer, CONTEXT, validation_fraction=FRACTION)
    validation = build_text_validation_loader(settings, StreamLayout(micro_batch_size=4))
    held_out = [row for batch in validation for row, ok in zip(full_rows(batch), batch["loss_mask"][:, 0] > 0) if ok]
    assert held_out == split("validation") and held_out


def test_same_settings_same_stream_other_seed_other_stream(corpus):
    first = reference(corpus, 30)
    assert reference(corpus, 30) == first
    assert reference(corpus, 30, seed=7) != first


@pytest.mark.parametrize("dp_size, num_workers", [(2, 0), (1, 2), (2, 2), (4, 1)])
def test_ranks_and_workers_partition_the_single_rank_stream(corpus, dp_size, num_workers):
    per_rank = [stream(text_loader(corpus, StreamLayout(3, r, dp_size, num_workers)), 6) for r in range(dp_size)]
    merged = merge_ranks(per_rank)
    assert merged == reference(corpus, len(merged))


def test_resume_is_exact_across_rank_and_worker_changes(corpus):
    """2 ranks -> 1 rank with 2 workers -> 4 ranks, stopping mid-window each time."""
    expected = reference(corpus, 90)
    seen, states = run_chain(
        [(2, 0, 3, 4), (1, 2, 2, 7), (4, 0, 1, 5)], lambda layout: text_loader(corpus, layout), stream
    )
    state = states[-1]
    assert state["consumed_samples"] == 24 + 14 + 20
    assert seen == expected[:58]


def test_one_ranks_state_cannot_resume_at_another_dp_size(corpus):
    ranks = [text_loader(corpus, StreamLayout(3, r, 2)) for r in range(2)]
    for one in ranks:
        stream(one, 2)
    single = text_loader(corpus)
    with pytest.raises(
        ValueError, match=r"lane 1 says 0 samples were consumed, but consumed_samples=12 means 3.*merge_states"
    ):
        single.load_state_dict(ranks[0].state_dict())
    single.load_state_dict(merge_states([one.state_dict() for one in ranks]))


def test_corpus_too_small_for_the_lanes_is_an_error(corpus, tmp_path):
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text(json.dumps({"text": "w1 w2 w3"}) + "\n" + json.dumps({"text": "w4 w5"}) + "\n")
    with pytest.raises(ValueError, match=r"lane \d found no training document in epoch \d+ .* use fewer lanes"):
        stream(text_loader(corpus, files=[str(tiny)], validation_fraction=0.0), 3)
