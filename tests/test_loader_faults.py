"""Bad shards: a clear error naming the shard (and sample), or, opted in, masked rows that are counted."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from test_loader import LANES, merge_ranks, sample_tokens, stream_ids, write_dataset

from megatron_sffn.data.loader import build_train_loader, build_validation_loader
from megatron_sffn.data.streaming import StreamLayout, merge_states
from megatron_sffn.data.tar_shards import ShardError

TRAIN = 61
PER_SHARD = 7
BAD = "train/train-000002.tar"  # holds train samples 14..20
BAD_IDS = set(range(14, 21))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def delete(path: Path) -> None:
    path.unlink()


def flip_payload_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[512 + 3] ^= 0xFF  # inside the first member's token bytes: the tar stays well-formed
    path.write_bytes(bytes(data))


def short_sample(path: Path) -> None:
    with wds.TarWriter(str(path)) as tar:
        for i in range(14, 21):
            tokens = sample_tokens(i)[: 5 if i == 16 else None]
            tar.write({"__key__": f"{i:010d}", "tokens.u16": tokens.astype("<u2").tobytes()})


def swap_with_next(path: Path) -> None:
    other = path.with_name("train-000003.tar")
    tmp = path.with_suffix(".swap")
    shutil.move(path, tmp)
    shutil.move(other, path)
    shutil.move(tmp, other)


@pytest.mark.parametrize(
    "damage, message",
    [
        (truncate, r"train-000002\.tar: (unreadable tar stream|holds \d+ samples, the manifest says 7)"),
        (delete, r"train-000002\.tar: shard is missing"),
        (flip_payload_byte, r"train-000002\.tar: sha256 is [0-9a-f]+, the manifest says [0-9a-f]+ \(corrupt shard\)"),
        (short_sample, r"train-000002\.tar: sample 0000000016 has 10 bytes \(5 tokens\), expected 9 uint16 tokens"),
        (
            swap_with_next,
            r"train-000002\.tar: sample 0 is member '0000000021\.tokens\.u16', expected '0000000014\.tokens\.u16'",
        ),
    ],
)
@pytest.mark.parametrize("num_workers", [0, 1])
def test_bad_shard_stops_training_naming_shard_and_sample(tmp_path, damage, message, num_workers):
    data = write_dataset(tmp_path, train=TRAIN, per_shard=PER_SHARD)
    damage(data / BAD)
    loader = build_train_loader(data, StreamLayout(micro_batch_size=8, num_workers=num_workers), lanes=LANES)
    with pytest.raises(ShardError, match=message):
        stream_ids(loader, 8)  # one epoch reads every shard


def expected_with_masks(data: Path, samples: int) -> list[int | None]:
    """The intact dataset's stream with the bad shard's samples replaced by None (masked)."""
    clean = build_train_loader(data, StreamLayout(micro_batch_size=1), lanes=LANES)
    ids, _ = stream_ids(clean, samples)
    return [None if i in BAD_IDS else i for i in ids]


@pytest.mark.parametrize("dp_size, num_workers", [(2, 1), (1, 2), (2, 2)])
def test_skip_mode_masks_bad_shard_in_place_and_counts_it(tmp_path, dp_size, num_workers):
    data = write_dataset(tmp_path, train=TRAIN, per_shard=PER_SHARD)
    expected = expected_with_masks(data, 2 * 17 * 4)
    truncate(data / BAD)

    per_rank, loaders = [], []
    for rank in range(dp_size):
        layout = StreamLayout(micro_batch_size=4, dp_rank=rank, dp_size=dp_size, num_workers=num_workers)
        loader = build_train_loader(data, layout, lanes=LANES, skip_bad_shards=True)
        ids, valid = stream_ids(loader, 34 // dp_size)
        per_rank.append([i if ok else None for i, ok in zip(ids, valid)])
        loaders.append(loader)
    got = merge_ranks(per_rank)
    assert got == expected[: len(got)]  # positions never shift: same order, bad samples masked
    assert Counter(i for i in got[:TRAIN] if i is not None) == Counter(set(range(TRAIN)) - BAD_IDS)

    masked = sum(loader.stats.masked_samples for loader in loaders)
    assert masked == sum(i is None for i in got) == 2 * len(BAD_IDS) + sum(i is None for i in got[2 * TRAIN :])
    for loader in loaders:
        stats = loader.state_dict()["stats"]
        if stats["bad_shard_reads"]:
            assert list(stats["bad_shards"]) == [str(data / BAD)]
    assert sum(loader.stats.bad_shard_reads for loader in loaders) >= 2  # read (and reported) in both epochs


@pytest.mark.parametrize("dp_size, num_workers", [(1, 1), (1, 2), (2, 2)])
def test_skip_mode_validation_masks_bad_shard(tmp_path, dp_size, num_workers):
    data = write_dataset(tmp_path, validation=17, per_shard=PER_SHARD)
    delete(data / "validation/validation-000001.tar")  # validation samples 7..13
    real, masked = [], 0
    for rank in range(dp_size):
        layout = StreamLayout(micro_batch_size=4, dp_rank=rank, dp_size=dp_size, num_workers=num_workers)
        loader = build_validation_loader(data, layout, skip_bad_shards=True)
        rank_real = []
        for batch in loader:
            valid = batch["loss_mask"][:, 0] > 0
            assert not batch["tokens"][~valid].any()  # every masked row is a stand-in, never real data
            rank_real += batch["tokens"][valid, 0].tolist()
        assert loader.stats.masked_samples == len(loader) * 4 - len(rank_real)
        if loader.stats.bad_shards:
            assert list(loader.stats.bad_shards) == [str(data / "validation/validation-000001.tar")]
        real += rank_real
        masked += loader.stats.masked_samples
    assert sorted(real) == list(range(7)) + list(range(14, 17))  # each intact sample exactly once
    assert masked == len(loader) * 4 * dp_size - 10
    with pytest.raises(ShardError, match="validation-000001.tar: shard is missing"):
        list(build_validation_loader(data, StreamLayout(micro_batch_size=4)))


def test_token_ids_beyond_the_vocabulary_are_refused(tmp_path):
    data = write_dataset(tmp_path, per_shard=PER_SHARD)
    with wds.TarWriter(str(data / BAD)) as tar:
        for i in range(14, 21):
            tokens = sample_tokens(i)
            if i == 19:
                tokens = np.full_like(tokens, 60_000)
            tar.write({"__key__": f"{i:010d}", "tokens.u16": tokens.astype("<u2").tobytes()})
    loader = build_train_loader(data, StreamLayout(micro_batch_size=8), lanes=LANES, verify_checksums=False)
    with pytest.raises(
        ShardError, match=r"train-000002\.tar: sample 0000000019 holds token id 60000, expected ids below"
    ):
        stream_ids(loader, 8)


def test_skip_counters_survive_resume_without_double_counting(tmp_path):
    data = write_dataset(tmp_path, train=TRAIN, per_shard=PER_SHARD)
    delete(data / BAD)

    def run(dp_size: int, state: dict | None) -> list[dict]:
        loaders = [
            build_train_loader(
                data, StreamLayout(micro_batch_size=4, dp_rank=r, dp_size=dp_size), lanes=LANES, skip_bad_shards=True
            )
            for r in range(dp_size)
        ]
        masked = 0
        for one in loaders:
            if state is not None:
                one.load_state_dict(state)
            masked += sum(not ok for ok in stream_ids(one, 16 // dp_size)[1])
        return [one.state_dict() for one in loaders], masked

    states, first = run(2, None)
    merged = merge_states(states)
    states, second = run(1, merged)
    assert first > 0 and second > 0  # 64 positions per run: both runs cross the bad shard
    assert merge_states(states)["stats"]["masked_samples"] == first + second
    assert list(merge_states(states)["stats"]["bad_shards"]) == [str(data / BAD)]
