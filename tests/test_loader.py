"""The prepared-shard loader: one global order whatever the layout, exact resume, full validation pass.

Datasets here are written directly in the shard format (``shard_writer`` +
manifest), with sample ``i`` of a split holding token ``i`` first, so every
batch row says which sample it is.  The reference for any parallel layout is
the single-rank, single-process stream.
"""

from __future__ import annotations

import pickle
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_sffn.data.loader import build_train_loader, build_validation_loader
from megatron_sffn.data.manifest import ManifestError, TokenizerInfo
from megatron_sffn.data.order import ShardedOrder, reader_slot
from megatron_sffn.data.streaming import StreamLayout, merge_states
from tests.prepared_data import write_prepared

VOCAB = 50_000
CONTEXT = 8
LANES = 8


def sample_tokens(index: int, sample_length: int = CONTEXT + 1) -> np.ndarray:
    """Sample ``index`` of a split: its first token is its index, the rest vary with it."""
    return (index + np.arange(sample_length) * 1009) % VOCAB


def write_dataset(out: Path, train: int = 61, validation: int = 17, per_shard: int = 7) -> Path:
    """A prepared dataset with ``train``/``validation`` samples, built without ``prepare``."""
    counts = {"train": train, "validation": validation}
    splits = {split: sample_tokens(np.arange(total)[:, None]) for split, total in counts.items()}
    write_prepared(
        out,
        splits,
        context_length=CONTEXT,
        per_shard=per_shard,
        tokenizer=TokenizerInfo("test-vocab", "hf-json", VOCAB, 0, "0" * 64),
        settings={"validation_fraction": 0.2, "seed": 0},
        created_by="tests",
    )
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("shards"))


def stream_ids(loader, batches: int) -> tuple[list[int], list[bool]]:
    """Sample ids (first token) and validity of the next ``batches`` batches; stops the workers after."""
    ids, valid = [], []
    it = iter(loader)
    for batch in islice(it, batches):
        ids += batch["tokens"][:, 0].tolist()
        valid += (batch["loss_mask"][:, 0] > 0).tolist()
    it.close()
    return ids, valid


def merge_ranks(per_rank: list[list[int]], start: int = 0) -> list[int]:
    """The documented merge rule: from a resume point ``start`` on, position g belongs to rank g % R."""
    ranks, taken = len(per_rank), [0] * len(per_rank)
    merged = []
    for g in range(start, start + ranks * min(len(s) for s in per_rank)):
        merged.append(per_rank[g % ranks][taken[g % ranks]])
        taken[g % ranks] += 1
    return merged


def run_chain(hops, build, take) -> tuple[list, list[dict]]:
    """Run every hop from the previous hop's merged state; returns what all hops read and each merged state."""
    seen, merged, state = [], [], None
    for dp_size, workers, micro, batches in hops:
        loaders = [build(StreamLayout(micro, r, dp_size, workers)) for r in range(dp_size)]
        start = 0
        if state is not None:
            start = state["consumed_samples"]
            for one in loaders:
                one.load_state_dict(state)
        seen += merge_ranks([take(one, batches) for one in loaders], start)
        state = merge_states([one.state_dict() for one in loaders])
        assert state["consumed_samples"] == len(seen)
        merged.append(state)
    return seen, merged


def reference(dataset: Path, samples: int, seed: int = 1234) -> list[int]:
    ids, _ = stream_ids(build_train_loader(dataset, StreamLayout(micro_batch_size=1), seed=seed, lanes=LANES), samples)
    return ids


def test_batch_format(dataset):
    loader = build_train_loader(dataset, StreamLayout(micro_batch_size=5), lanes=LANES)
    batch = next(iter(loader))
    assert batch["attention_mask"] is None
    assert set(batch) == {"tokens", "labels", "loss_mask", "attention_mask", "position_ids"}
    for key in ("tokens", "labels", "position_ids"):
        assert batch[key].dtype == torch.int64 and batch[key].shape == (5, CONTEXT)
    assert batch["loss_mask"].dtype == torch.float32 and torch.equal(batch["loss_mask"], torch.ones(5, CONTEXT))
    assert torch.equal(batch["position_ids"], torch.arange(CONTEXT).repeat(5, 1))
    for row in range(5):
        full = torch.from_numpy(sample_tokens(int(batch["tokens"][row, 0])))
        assert torch.equal(batch["tokens"][row], full[:-1]) and torch.equal(batch["labels"][row], full[1:])


def test_every_epoch_uses_every_sample_once_and_reshuffles(dataset):
    n = 61
    ids = reference(dataset, 3 * n)
    epochs = [ids[e * n : (e + 1) * n] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))
    assert epochs[0] != list(range(n)), "the order is not shuffled"
    assert len({tuple(e) for e in epochs}) == 3, "epochs must be reshuffled"


def test_same_seed_same_order_other_seed_other_order(dataset):
    first = reference(dataset, 40)
    assert reference(dataset, 40) == first
    assert reference(dataset, 40, seed=99) != first


@pytest.mark.parametrize("dp_size, num_workers, micro_batch", [(1, 2, 3), (2, 0, 4), (2, 2, 3), (4, 1, 2), (8, 0, 5)])
def test_ranks_and_workers_partition_the_single_rank_stream(dataset, dp_size, num_workers, micro_batch):
    batches = 9  # crosses the 61-sample epoch boundary for every layout
    per_rank = [
        stream_ids(
            build_train_loader(dataset, StreamLayout(micro_batch, r, dp_size, num_workers), lanes=LANES), batches
        )[0]
        for r in range(dp_size)
    ]
    merged = merge_ranks(per_rank)
    assert len(merged) == dp_size * batches * micro_batch
    assert merged == reference(dataset, len(merged))


def test_resume_is_exact_across_rank_and_worker_changes(dataset):
    """2 ranks -> 1 rank (2 workers) -> 4 ranks, with batch sizes that do not divide the epoch."""
    expected = reference(dataset, 160)
    seen: list[int] = []

    def run(dp_size: int, num_workers: int, micro_batch: int, batches: int, state: dict | None) -> dict:
        loaders = [
            build_train_loader(dataset, StreamLayout(micro_batch, r, dp_size, num_workers), lanes=LANES)
            for r in range(dp_size)
        ]
        for loader in loaders:
            if state is not None:
                loader.load_state_dict(state)
        start = state["consumed_samples"] if state else 0
        seen.extend(merge_ranks([stream_ids(loader, batches)[0] for loader in loaders], start))
        states = [loader.state_dict() for loader in loaders]
        assert all(s == states[0] for s in states)
        return states[0]

    state = run(2, 0, 3, 7, None)
    assert state["consumed_samples"] == 42
    state = run(1, 2, 5, 9, state)
    assert state["consumed_samples"] == 87
    state = run(4, 1, 2, 9, state)
    assert state["consumed_samples"] == 159
    assert seen == expected[:159]


def test_restart_after_partial_iteration_resumes_at_next_sample(dataset):
    loader = build_train_loader(dataset, StreamLayout(micro_batch_size=4, num_workers=2), lanes=LANES)
    first, _ = stream_ids(loader, 5)  # the workers have prefetched well beyond these 20 samples
    again = build_train_loader(dataset, StreamLayout(micro_batch_size=4), lanes=LANES)
    again.load_state_dict(loader.state_dict())
    rest, _ = stream_ids(again, 5)
    assert first + rest == reference(dataset, 40)


def test_state_from_another_order_is_refused(dataset):
    state = build_train_loader(dataset, StreamLayout(micro_batch_size=2), lanes=LANES).state_dict()
    with pytest.raises(ValueError, match="'seed' is 1234, this loader has 7"):
        build_train_loader(dataset, StreamLayout(micro_batch_size=2), seed=7, lanes=LANES).load_state_dict(state)
    with pytest.raises(ValueError, match="'lanes' is 8, this loader has 16"):
        build_train_loader(dataset, StreamLayout(micro_batch_size=2), lanes=16).load_state_dict(state)


def test_lanes_must_split_evenly_over_readers(dataset):
    with pytest.raises(ValueError, match=r"lanes=8 must be a positive multiple of .* 3 x 1 = 3"):
        build_train_loader(dataset, StreamLayout(micro_batch_size=2, dp_size=3), lanes=LANES)


def test_trainer_tokenizer_must_match_the_manifest(dataset):
    identity = {"spec": "other.json", "type": "hf-json", "vocab_size": VOCAB, "eos_id": 0, "sha256": "f" * 64}
    with pytest.raises(
        ManifestError, match=r"manifest\.json: tokenizer 'other.json' does not match .*tokenizer\.sha256 is 'f+'"
    ):
        build_train_loader(dataset, StreamLayout(micro_batch_size=2), lanes=LANES, tokenizer=identity)
    same = {**identity, "sha256": "0" * 64}
    build_train_loader(dataset, StreamLayout(micro_batch_size=2), lanes=LANES, tokenizer=same)


@pytest.mark.parametrize("dp_size, num_workers, micro_batch, multiple", [(1, 0, 4, 1), (2, 2, 3, 1), (3, 0, 2, 4)])
def test_validation_pass_covers_each_sample_once(dataset, dp_size, num_workers, micro_batch, multiple):
    layouts = [StreamLayout(micro_batch, r, dp_size, num_workers) for r in range(dp_size)]
    loaders = [build_validation_loader(dataset, layout, batches_multiple_of=multiple) for layout in layouts]
    lengths = {len(loader) for loader in loaders}
    assert len(lengths) == 1 and lengths.pop() % multiple == 0
    real = Counter()
    for loader in loaders:
        batches = list(loader)
        assert len(batches) == len(loader)
        assert all(b["tokens"].shape == (micro_batch, CONTEXT) for b in batches)
        for batch in batches:
            valid = batch["loss_mask"][:, 0] > 0
            assert torch.all(batch["loss_mask"][~valid] == 0) and torch.all(batch["tokens"][~valid] == 0)
            real.update(batch["tokens"][valid, 0].tolist())
    assert real == Counter(range(17))
    assert list(loaders[0]) and [b["tokens"].tolist() for b in loaders[0]] == [b["tokens"].tolist() for b in loaders[0]]


@pytest.mark.parametrize("template", ["pipe:cat {root}/{{path}}", "file://{root}/{{path}}"])
def test_shards_stream_from_urls_and_pipes(dataset, template):
    loader = build_train_loader(
        dataset,
        StreamLayout(micro_batch_size=4, num_workers=1),
        lanes=LANES,
        shard_url_template=template.format(root=dataset),
    )
    ids, _ = stream_ids(loader, 20)
    assert ids == reference(dataset, 80)


def test_readers_survive_pickling_for_spawned_workers(dataset):
    """Spawn/forkserver start methods pickle the reader; the copy must read the same positions."""
    loader = build_train_loader(dataset, StreamLayout(micro_batch_size=1), lanes=LANES)
    copy = pickle.loads(pickle.dumps(loader.source))
    slot = reader_slot(5, 1, 2, 0, 1)
    original = [row.tokens.tolist() for row in islice(loader.source.rows(slot, {}), 30)]
    assert [row.tokens.tolist() for row in islice(copy.rows(slot, {}), 30)] == original


@pytest.mark.parametrize("shards, lanes", [(40, 8), (2, 8), (9, 8)])
def test_lanes_read_contiguous_segments_so_ranks_read_few_shards(shards, lanes):
    """Each lane reads a contiguous run of the epoch's shards: a shard is read twice only where
    two lanes' segments meet, and a rank reads only its own lanes' shards."""
    sizes = [7] * (shards - 1) + [4]
    order = ShardedOrder(sizes, seed=3, lanes=lanes)
    n = order.epoch_samples
    for epoch in range(2):
        touched = [set() for _ in range(lanes)]
        for g in range(epoch * n, (epoch + 1) * n):
            touched[g % lanes].add(order.locate(g).shard)
        assert sum(len(t) for t in touched) <= shards + lanes - 1
        rank0_of_4 = set().union(*touched[0::4])
        assert len(rank0_of_4) <= (lanes // 4) * (shards // lanes + 2)
