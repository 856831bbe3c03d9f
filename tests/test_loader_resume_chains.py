"""Chains of resumes: every hop saves the merged state of all ranks and the next hop loads it at another
data-parallel size, worker count and micro-batch size; the concatenation of all hops must be the
uninterrupted single-rank stream, for prepared shards and for raw text, with skip counters exact.

Both corpora contain bad input in skip mode (a deleted shard; undecodable and lone-surrogate
documents), so the chains also check that masks stay aligned and that nothing is counted twice.
"""

from __future__ import annotations

import pytest
from test_loader import LANES as SHARD_LANES
from test_loader import run_chain, stream_ids, write_dataset
from test_loader_faults import BAD, PER_SHARD, TRAIN, expected_with_masks
from test_loader_on_the_fly import corpus, full_rows, stream, text_loader  # noqa: F401  (corpus is a fixture)

from megatron_sffn.data.loader import build_train_loader
from megatron_sffn.data.streaming import StreamLayout, merge_states

# (dp_size, num_workers, micro_batch_size, batches): DP 1 -> 2 -> 2 -> 4 -> 2 -> 1, workers and batch changing.
HOPS = [(1, 0, 3, 8), (2, 1, 2, 4), (2, 2, 1, 6), (4, 2, 1, 4), (2, 0, 3, 3), (1, 2, 2, 6)]
TEXT_HOPS = [(1, 0, 3, 3), (2, 1, 2, 2), (2, 2, 1, 3), (4, 1, 1, 2), (2, 0, 3, 2), (1, 2, 2, 4)]


def test_shard_resume_chain_equals_the_uninterrupted_stream(tmp_path):
    data = write_dataset(tmp_path, train=TRAIN, per_shard=PER_SHARD)
    expected = expected_with_masks(data, 200)
    (data / BAD).unlink()

    def build(layout):
        return build_train_loader(data, layout, lanes=SHARD_LANES, skip_bad_shards=True)

    def take(loader, batches):
        ids, valid = stream_ids(loader, batches)
        return [i if ok else None for i, ok in zip(ids, valid)]

    seen, states = run_chain(HOPS, build, take)
    assert len(seen) > TRAIN + 10  # crosses an epoch boundary and the bad shard twice
    assert seen == expected[: len(seen)]
    masked = [state["stats"]["masked_samples"] for state in states]
    offsets = [state["consumed_samples"] for state in states]
    assert masked == [sum(i is None for i in seen[:n]) for n in offsets]
    assert list(states[-1]["stats"]["bad_shards"]) == [str(data / BAD)]


@pytest.fixture(scope="module")
def hostile_text(corpus, tmp_path_factory) -> list[str]:  # noqa: F811
    """Two of the clean files and one holding undecodable and lone-surrogate lines (3 files < 4 lanes,
    so that file is read in document-stride units by two lanes)."""
    paths, _ = corpus
    path = tmp_path_factory.mktemp("hostile") / "part-bad.jsonl"
    with open(path, "wb") as out:
        for i, line in enumerate(open(paths[2], "rb")):
            if i % 3 == 1:
                out.write(b'{"text": "w1 \\ud800 w2"}\n' if i % 2 else b'{"text": "w3 \xff w4"}\n')
            out.write(line)
    return [*paths[:2], str(path)]


def test_text_resume_chain_equals_the_uninterrupted_stream_and_counts_skips_once(corpus, hostile_text):  # noqa: F811
    def build(layout):
        return text_loader(corpus, layout, files=hostile_text, bad_documents="skip")

    reference = build(StreamLayout(1))
    expected, skipped_after = [], []
    it = iter(reference)
    for _ in range(60):
        expected += full_rows(next(it))
        skipped_after.append(reference.stats.skipped_documents)
    it.close()
    assert skipped_after[-1] >= 4  # several bad documents fall in the stream

    seen, states = run_chain(TEXT_HOPS, build, stream)
    assert len(seen) <= len(expected)
    assert seen == expected[: len(seen)]
    for state in states:
        assert state["stats"]["skipped_documents"] == skipped_after[state["consumed_samples"] - 1]


def test_rank_states_with_a_stale_copy_of_a_lane_are_refused(corpus):  # noqa: F811
    ranks = [text_loader(corpus, StreamLayout(3, r, 2)) for r in range(2)]
    for one in ranks:
        stream(one, 2)
    states = [one.state_dict() for one in ranks]
    assert set(states[0]["lane_state"]) == {"0", "2"} and set(states[1]["lane_state"]) == {"1", "3"}
    stale = {
        **states[1],
        "lane_state": {
            **states[1]["lane_state"],
            "0": {"count": 0, "window_start": [0, 0, 0, 0], "window_end": [0, 0, 0, 0]},
        },
    }
    with pytest.raises(ValueError, match=r"rank states 0 and 1 hold different cursors for lane 0"):
        merge_states([states[0], stale])
