"""The run's data: this rank's training stream and validation pass, and their checks against the model.

Every rank of a pipeline replica (all its TP ranks and PP stages) reads the
same data-parallel share of each global batch.  Only the first and last
stages use it, but reading it everywhere keeps every rank's loader at the
same position, so any rank's state is the run's state; the cost is a few
kilobytes of token ids per micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config.train import TrainConfig
from ..data.loader import build_train_loader, build_validation_loader, open_dataset
from ..data.manifest import Manifest
from ..data.streaming import TrainStream, merge_states
from ..data.validation import ValidationLoader


def check_dataset(config: TrainConfig) -> Manifest:
    """Open the prepared dataset and check it fits the model; cheap, so it runs before any heavy set-up.

    The manifest's context length must equal ``model.seq_length`` (samples
    are packed to it) and every token id must be a row of the embedding.
    """
    data = config.data
    if data.path is None:
        raise ValueError(
            f"data.raw={data.raw!r}: on-the-fly tokenization is not wired into the trainer; "
            f"prepare the files with data_tools.prepare and set data.path to the output directory"
        )
    manifest = open_dataset(data.path, data.tokenizer)
    if manifest.context_length != config.model.seq_length:
        raise ValueError(
            f"model.seq_length={config.model.seq_length} but the dataset {data.path} was packed to "
            f"context_length={manifest.context_length}; set model.seq_length={manifest.context_length} "
            f"or prepare the data again"
        )
    if manifest.tokenizer.vocab_size > config.model.vocab_size:
        raise ValueError(
            f"model.vocab_size={config.model.vocab_size} is smaller than the dataset tokenizer's vocabulary "
            f"({manifest.tokenizer.vocab_size} ids, {data.path}); token ids would index past the embedding"
        )
    return manifest


@dataclass
class RunData:
    train: TrainStream
    validation: ValidationLoader

    def global_train_state(self) -> dict[str, Any]:
        """The training stream's position merged over the data-parallel ranks (collective).

        A prepared dataset's state is the same on every rank; streams that
        keep per-rank cursors need all of them to resume at another DP size.
        """
        import torch.distributed as dist
        from megatron.core import parallel_state

        group = parallel_state.get_data_parallel_group_gloo(with_context_parallel=True)
        states: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(states, self.train.state_dict(), group=group)
        return merge_states(states)


def build_validation(config: TrainConfig, *, dp_rank: int, dp_size: int, micro_batches_per_step: int,
                     manifest: Manifest | None = None) -> ValidationLoader:
    """This rank's validation pass, padded to whole groups of ``micro_batches_per_step`` (pipeline calls)."""
    data = config.data
    return build_validation_loader(
        manifest or check_dataset(config),
        micro_batch_size=config.training.micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        num_workers=data.num_workers,
        skip_bad_shards=data.skip_bad_shards,
        batches_multiple_of=micro_batches_per_step,
        shard_url_template=data.shard_url_template,
    )


def build_run_data(config: TrainConfig, *, dp_rank: int, dp_size: int, micro_batches_per_step: int) -> RunData:
    data = config.data
    manifest = check_dataset(config)
    train = build_train_loader(
        manifest,
        micro_batch_size=config.training.micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        num_workers=data.num_workers,
        seed=data.seed,
        lanes=data.lanes,
        skip_bad_shards=data.skip_bad_shards,
        shard_url_template=data.shard_url_template,
    )
    validation = build_validation(
        config, dp_rank=dp_rank, dp_size=dp_size, micro_batches_per_step=micro_batches_per_step, manifest=manifest
    )
    return RunData(train=train, validation=validation)
