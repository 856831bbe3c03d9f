"""The run configuration: derived quantities and every inconsistency caught with the key named."""

from __future__ import annotations

import copy

import pytest
import yaml

from megatron_sffn.config.loading import ConfigError, from_dict, load_config, save_config
from megatron_sffn.config.train import TrainConfig
from megatron_sffn.planning.checks import check_run_config
from megatron_sffn.planning.steps import resolved_train_steps, resolved_warmup_steps

BASE = {
    "run_dir": "runs/test",
    "model": {"hidden_size": 64, "num_layers": 4, "num_attention_heads": 4, "seq_length": 32, "vocab_size": 128},
    "data": {"path": "data/prepared"},
    "training": {"micro_batch_size": 2, "global_batch_size": 8, "train_steps": 10},
}


def build(**sections) -> TrainConfig:
    """BASE with whole sections replaced or (for dicts) keys merged in."""
    data = copy.deepcopy(BASE)
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(name), dict):
            data[name].update(value)
        else:
            data[name] = value
    return from_dict(TrainConfig, data, "run.yaml")


def test_defaults_are_the_paper_recipe():
    cfg = build()
    opt = cfg.optimizer
    assert (opt.adam_beta1, opt.adam_beta2, opt.adam_eps, opt.weight_decay, opt.clip_grad) == (
        0.9,
        0.999,
        1e-8,
        0.1,
        1.0,
    )
    assert opt.min_lr_ratio == 0.1 and opt.decay_style == "cosine"
    assert opt.warmup_fraction == 0.1 and opt.warmup_steps is None
    assert cfg.parallel.tensor_parallel == cfg.parallel.pipeline_parallel == 1
    assert cfg.eval.max_batches is None and cfg.eval.at_end


def test_token_budget_becomes_whole_steps():
    # 8 sequences x 32 tokens = 256 tokens per step; 2600 tokens hold 10 whole steps (the budget is not exceeded).
    cfg = build(training={"train_steps": None, "train_tokens": 2600})
    assert cfg.tokens_per_step() == 256
    assert resolved_train_steps(cfg) == 10
    assert resolved_train_steps(build(training={"train_steps": 7})) == 7


def test_warmup_resolution():
    assert resolved_warmup_steps(build(training={"train_steps": 1000})) == 100
    assert resolved_warmup_steps(build(optimizer={"warmup_fraction": 0.25}, training={"train_steps": 10})) == 2
    assert resolved_warmup_steps(build(optimizer={"warmup_steps": 30}, training={"train_steps": 1000})) == 30
    assert resolved_warmup_steps(build(optimizer={"warmup_steps": 30}, training={"train_steps": 10})) == 10
    assert resolved_warmup_steps(build(optimizer={"warmup_steps": 0})) == 0


def test_device_dependent_choices():
    cfg = build()
    assert cfg.training.resolved_precision(on_gpu=True) == "bf16"
    assert cfg.training.resolved_precision(on_gpu=False) == "fp32"
    assert build(training={"precision": "fp32"}).training.resolved_precision(on_gpu=True) == "fp32"
    assert (cfg.parallel.resolved_backend(True), cfg.parallel.resolved_backend(False)) == ("nccl", "gloo")
    assert build(parallel={"backend": "gloo"}).parallel.resolved_backend(True) == "gloo"
    assert (cfg.parallel.resolved_distributed_optimizer(True), cfg.parallel.resolved_distributed_optimizer(False)) == (
        True,
        False,
    )
    forced = build(parallel={"use_distributed_optimizer": False})
    assert forced.parallel.resolved_distributed_optimizer(True) is False


def test_layout_at_launch():
    cfg = build(parallel={"tensor_parallel": 2}, training={"micro_batch_size": 2, "global_batch_size": 16})
    assert cfg.data_parallel_size(8) == 4
    assert cfg.num_micro_batches(8) == 2  # 16 = 2 micro x 2 per replica x 4 replicas
    assert cfg.num_micro_batches(2) == 8
    with pytest.raises(
        ValueError,
        match=r"world size 3 is not divisible by parallel.tensor_parallel=2 x parallel.pipeline_parallel=1 = 2",
    ):
        cfg.validate_layout(3)
    with pytest.raises(
        ValueError,
        match=r"training.global_batch_size=16 is not divisible by training.micro_batch_size=2 x data-parallel size 16 = 32",
    ):
        cfg.validate_layout(32)


def test_every_data_reader_owns_whole_lanes():
    cfg = build(data={"lanes": 12, "num_workers": 3}, training={"micro_batch_size": 1, "global_batch_size": 16})
    cfg.validate_layout(1)
    cfg.validate_layout(4)  # 4 replicas x 3 workers = 12 readers
    with pytest.raises(
        ValueError, match=r"data.lanes=12 is not a multiple of data-parallel size 8 x data.num_workers=3 = 24"
    ):
        cfg.validate_layout(8)
    in_process = build(data={"lanes": 4, "num_workers": 0}, training={"micro_batch_size": 1, "global_batch_size": 16})
    in_process.validate_layout(4)  # no workers: the rank itself is the one reader


@pytest.mark.parametrize(
    "sections, fragment",
    [
        (
            {"training": {"train_steps": None}},
            "set exactly one of train_steps or train_tokens, got train_steps=None train_tokens=None",
        ),
        (
            {"training": {"train_tokens": 5000}},
            "set exactly one of train_steps or train_tokens, got train_steps=10 train_tokens=5000",
        ),
        (
            {"training": {"train_steps": None, "train_tokens": 100}},
            "training.train_tokens=100 is less than one step of 256 tokens",
        ),
        ({"training": {"train_steps": 0}}, "train_steps=0 must be positive"),
        ({"training": {"micro_batch_size": 3}}, "global_batch_size=8 is not divisible by micro_batch_size=3"),
        (
            {"training": {"precision": "fp16"}},
            "run.yaml:training.precision: 'fp16' is not one of ['auto', 'bf16', 'fp32']",
        ),
        ({"training": {"recompute_granularity": "full"}}, "recompute_granularity='full' needs recompute_method"),
        (
            {"training": {"recompute_method": "block"}},
            "recompute_method='block' / recompute_num_layers=None need recompute_granularity",
        ),
        (
            {
                "training": {
                    "recompute_granularity": "selective",
                    "recompute_method": "uniform",
                    "recompute_num_layers": 1,
                }
            },
            "recompute_granularity='selective' takes no recompute_method",
        ),
        (
            {
                "training": {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 3},
                "parallel": {"pipeline_parallel": 2},
            },
            "training.recompute_num_layers=3 exceeds the 2 layers per pipeline stage",
        ),
        ({"parallel": {"pipeline_parallel": 3}}, "model.num_layers=4 is not divisible by parallel.pipeline_parallel=3"),
        (
            {"parallel": {"tensor_parallel": 8}},
            "model.num_attention_heads=4 is not divisible by parallel.tensor_parallel=8",
        ),
        (
            {"model": {**BASE["model"], "num_query_groups": 2}, "parallel": {"tensor_parallel": 4}},
            "model.num_query_groups=2 is not divisible by parallel.tensor_parallel=4",
        ),
        (
            {"model": {**BASE["model"], "ffn_hidden_size": 250}, "parallel": {"tensor_parallel": 4}},
            "model.ffn_hidden_size=250 is not divisible by parallel.tensor_parallel=4",
        ),
        (
            {
                "model": {**BASE["model"], "ffn": {"structure": "blockshuffle", "blocks": 2}},
                "parallel": {"tensor_parallel": 4},
            },
            "model.ffn (structure=blockshuffle, rank=None, blocks=2, tp_strategy=auto) cannot be split over "
            "parallel.tensor_parallel=4: blockshuffle: blocks=2 is not divisible by tensor_model_parallel_size=4",
        ),
        (
            {
                "model": {**BASE["model"], "ffn": {"structure": "blockdense", "blocks": 2, "rank": 32}},
                "parallel": {"tensor_parallel": 4},
            },
            "parallel.tensor_parallel=4: blockdense: blocks=2 is not divisible by tensor_model_parallel_size=4",
        ),
        (
            {
                "model": {**BASE["model"], "ffn": {"structure": "blockshuffle", "blocks": 32}},
                "parallel": {"tensor_parallel": 4},
            },
            "blockshuffle: hidden_size/blocks=2 is not divisible by tensor_model_parallel_size=4",
        ),
        (
            {
                "model": {**BASE["model"], "ffn": {"structure": "lowrank", "rank": 16, "tp_strategy": "sideways"}},
                "parallel": {"tensor_parallel": 2},
            },
            "lowrank: tp_strategy='sideways'; expected 'auto' or one of",
        ),
        ({"parallel": {"tensor_parallel": 0}}, "tensor_parallel=0 must be positive"),
        ({"parallel": {"backend": "mpi"}}, "run.yaml:parallel.backend: 'mpi' is not one of"),
        ({"data": {"path": None}}, "set exactly one of path (a prepared dataset directory) or raw"),
        ({"data": {"raw": ["a.parquet"]}}, "set exactly one of path"),
        (
            {"data": {"path": None, "raw": ["a.parquet"]}},
            "raw=['a.parquet'] is tokenized on the fly and needs tokenizer",
        ),
        ({"data": {"path": None, "raw": [], "tokenizer": "t.json"}}, "raw=[] lists no files"),
        ({"data": {"num_workers": -1}}, "num_workers=-1 must be >= 0"),
        ({"data": {"lanes": 0}}, "lanes=0 must be positive"),
        ({"data": {"shard_url_template": "s3://b/x.tar"}}, "shard_url_template='s3://b/x.tar' must contain {path}"),
        (
            {"optimizer": {"warmup_fraction": 0.1, "warmup_steps": 5}},
            "set at most one of warmup_fraction=0.1 and warmup_steps=5",
        ),
        ({"optimizer": {"warmup_fraction": 1.5}}, "warmup_fraction=1.5 must be in [0, 1)"),
        ({"optimizer": {"lr": 0}}, "lr=0.0 must be positive"),
        ({"optimizer": {"adam_beta2": 1.0}}, "adam_beta2=1.0 must be in [0, 1)"),
        ({"optimizer": {"min_lr_ratio": 2}}, "min_lr_ratio=2.0 must be in [0, 1]"),
        ({"optimizer": {"clip_grad": -1}}, "clip_grad=-1.0 must be >= 0"),
        ({"optimizer": {"decay_style": "step"}}, "run.yaml:optimizer.decay_style: 'step' is not one of"),
        ({"checkpoint": {"save_interval": 0}}, "save_interval=0 must be positive"),
        ({"checkpoint": {"keep_last": 0}}, "keep_last=0 must be positive"),
        ({"logging": {"log_interval": 0}}, "log_interval=0 must be positive"),
        ({"logging": {"peak_tflops_per_device": -3}}, "peak_tflops_per_device=-3.0 must be positive"),
        ({"eval": {"max_batches": 0}}, "max_batches=0 must be positive"),
        ({"eval": {"intervall": 5}}, "run.yaml:eval.intervall: unknown key in section EvalConfig"),
        ({"run_dir": ""}, "run_dir is empty"),
    ],
)
def test_inconsistencies_name_the_key_and_value(sections, fragment):
    """Caught loading the config or, for what needs the sharding plan, in the preflight's config checks."""
    with pytest.raises(ConfigError) as err:
        check_run_config(build(**sections))
    assert fragment in str(err.value)


def test_missing_section_is_named():
    data = {k: v for k, v in BASE.items() if k != "training"}
    with pytest.raises(ConfigError, match="missing 1 required positional argument: 'training'"):
        from_dict(TrainConfig, data, "run.yaml")


def test_overrides_and_resolved_round_trip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(BASE))
    cfg = load_config(
        TrainConfig,
        path,
        [
            "parallel.tensor_parallel=2",
            "optimizer.lr=1e-3",
            "model.ffn.structure=lowrank",
            "model.ffn.rank=16",
            "training.train_steps=20",
        ],
    )
    assert cfg.parallel.tensor_parallel == 2 and cfg.optimizer.lr == 1e-3 and cfg.model.ffn.rank == 16
    assert resolved_train_steps(cfg) == 20
    saved = tmp_path / "run_dir" / "config.yaml"
    save_config(cfg, saved)
    reloaded = load_config(TrainConfig, saved)
    assert reloaded == cfg
    # The saved form carries the resolved warmup, so reloading it cannot trip the "at most one" check.
    assert yaml.safe_load(saved.read_text())["optimizer"]["warmup_fraction"] == 0.1
    with pytest.raises(ConfigError, match="overrides:parallel.tensor_paralel: unknown key"):
        load_config(TrainConfig, path, ["parallel.tensor_paralel=2"])
