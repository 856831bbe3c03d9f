"""The run's data: this rank's training stream and validation pass, and their checks against the model.

Two sources, one contract: a prepared dataset (``data.path``, webdataset
shards plus manifest) or raw parquet/JSONL/text files tokenized in the
loader (``data.raw``, held-out documents chosen by document hash as
``data_tools.prepare`` would).  Both give a resumable ``TrainStream`` whose
order depends only on the data, ``data.seed`` and ``data.lanes``.

Every rank of a pipeline replica (all its TP ranks and PP stages) reads the
same data-parallel share of each global batch.  Only the first and last
stages use it, but reading it everywhere keeps every rank's loader at the
same position; the cost is a few kilobytes of token ids per micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config.train import TrainConfig
from ..data.input_list import record_inputs, recorded_inputs
from ..data.loader import build_train_loader, build_validation_loader, open_dataset
from ..data.manifest import Manifest
from ..data.on_the_fly import TextSettings, build_text_train_loader, build_text_validation_loader, text_settings
from ..data.streaming import StreamLayout, TrainStream, merge_states
from ..data.text_sources import SourceFile
from ..data.tokenizer import load_tokenizer
from ..data.validation import ValidationLoader


def _check_vocab(config: TrainConfig, vocab_size: int, where: str) -> None:
    if vocab_size > config.model.vocab_size:
        raise ValueError(
            f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({vocab_size} ids, {where}); token ids would index past the embedding"
        )


def record_run_inputs(config: TrainConfig) -> None:
    """At a raw-mode run's first start write its resolved file list into the run directory; at a resume
    report how a fresh listing differs from it (rank 0 only, before the other ranks read it)."""
    if config.data.raw is not None:
        record_inputs(config.data.raw, config.run_dir)


def raw_sources(config: TrainConfig) -> list[SourceFile]:
    """The raw files of the run: those recorded in its run directory at its first start (see ``input_list``)."""
    assert config.data.raw is not None
    return recorded_inputs(config.data.raw, config.run_dir)


def check_dataset(config: TrainConfig) -> Manifest | None:
    """Open the data source and check it fits the model; cheap, so it runs before any heavy set-up.

    A prepared dataset's context length must equal ``model.seq_length``
    (samples are packed to it); every token id must be a row of the embedding.
    Returns the manifest of a prepared dataset (None for raw files).
    """
    data = config.data
    if data.raw is not None:
        raw_sources(config)
        _check_vocab(config, load_tokenizer(data.tokenizer).vocab_size, f"data.tokenizer={data.tokenizer}")
        return None
    manifest = open_dataset(data.path, data.tokenizer)
    if manifest.context_length != config.model.seq_length:
        raise ValueError(
            f"model.seq_length={config.model.seq_length} but the dataset {data.path} was packed to "
            f"context_length={manifest.context_length}; set model.seq_length={manifest.context_length} "
            f"or prepare the data again"
        )
    _check_vocab(config, manifest.tokenizer.vocab_size, f"dataset {data.path}")
    evaluates = config.eval.interval is not None or config.eval.at_end
    if evaluates and manifest.split("validation").samples == 0:
        raise ValueError(
            f"the dataset {data.path} has an empty validation split, but eval.interval={config.eval.interval} / "
            f"eval.at_end={config.eval.at_end} ask for evaluations; set eval.interval=null and eval.at_end=false "
            f"or prepare the data with a validation fraction"
        )
    return manifest


@dataclass
class RunData:
    train: TrainStream
    validation: ValidationLoader

    def state_dict(self) -> dict[str, Any]:
        """The training stream's position merged over the data-parallel ranks (collective).

        A prepared dataset's state is the same on every rank; a raw-text
        stream keeps per-lane cursors on the rank owning the lane, and all of
        them are needed to resume at another data-parallel size.
        """
        import torch.distributed as dist
        from megatron.core import parallel_state

        group = parallel_state.get_data_parallel_group_gloo(with_context_parallel=True)
        states: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(states, self.train.state_dict(), group=group)
        return merge_states(states)

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Continue the training stream where a checkpoint left it (None: a checkpoint without data state)."""
        if state is not None:
            self.train.load_state_dict(state)


def _layout(config: TrainConfig, dp_rank: int, dp_size: int) -> StreamLayout:
    """How this rank reads both loaders: the same batch size, share and workers."""
    return StreamLayout(config.training.micro_batch_size, dp_rank, dp_size, config.data.num_workers)


def _text_settings(config: TrainConfig) -> TextSettings:
    """The raw files' settings, the same for both loaders so that training never sees a held-out document."""
    data = config.data
    return text_settings(
        raw_sources(config),
        data.tokenizer,
        config.model.seq_length,
        bad_documents=data.bad_documents,
        skip_bad_files=data.skip_bad_shards,
    )


def build_validation(
    config: TrainConfig, *, dp_rank: int, dp_size: int, micro_batches_per_step: int, manifest: Manifest | None = None
) -> ValidationLoader:
    """This rank's validation pass, padded to whole groups of ``micro_batches_per_step`` (pipeline calls)."""
    data, layout = config.data, _layout(config, dp_rank, dp_size)
    if data.raw is not None:
        return build_text_validation_loader(_text_settings(config), layout, batches_multiple_of=micro_batches_per_step)
    return build_validation_loader(
        manifest or check_dataset(config),
        layout,
        skip_bad_shards=data.skip_bad_shards,
        batches_multiple_of=micro_batches_per_step,
        shard_url_template=data.shard_url_template,
    )


def build_run_data(config: TrainConfig, *, dp_rank: int, dp_size: int, micro_batches_per_step: int) -> RunData:
    data, layout = config.data, _layout(config, dp_rank, dp_size)
    manifest = check_dataset(config)
    if data.raw is not None:
        train = build_text_train_loader(_text_settings(config), layout, seed=data.seed, lanes=data.lanes)
    else:
        train = build_train_loader(
            manifest,
            layout,
            seed=data.seed,
            lanes=data.lanes,
            skip_bad_shards=data.skip_bad_shards,
            shard_url_template=data.shard_url_template,
        )
    validation = build_validation(
        config, dp_rank=dp_rank, dp_size=dp_size, micro_batches_per_step=micro_batches_per_step, manifest=manifest
    )
    return RunData(train=train, validation=validation)
