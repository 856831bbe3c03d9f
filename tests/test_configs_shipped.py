"""Every shipped config loads and validates, and the paper configs are the paper's runs.

References are the published numbers of "Building on Efficient Foundations"
(Wei et al., NeurIPS 2024), typed in here from the paper, and the closed-form
size formulas of its method section; parameter counts come from
``megatron_sffn.structured.counts`` layer by layer.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from megatron_sffn.accounting.model import count_parameters
from megatron_sffn.accounting.presets import preset, training_budget
from megatron_sffn.config.loading import from_dict, load_config, load_yaml_mapping
from megatron_sffn.config.model import ModelConfig
from megatron_sffn.config.train import TrainConfig
from megatron_sffn.planning.steps import resolved_train_steps, resolved_warmup_steps
from megatron_sffn.structured import counts

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RUN_CONFIGS = sorted([*CONFIGS.glob("*.yaml"), *(CONFIGS / "paper").glob("*.yaml")])
MODEL_CONFIGS = sorted((CONFIGS / "models").glob("*.yaml"))
PAPER_NAME = re.compile(r"(?P<size>s|m|l|xl)_(?:dense|(?P<structure>lowrank|blockdense|blockshuffle)(?P<ratio>63|32))")

# Section 2 of the paper: architecture, dense parameters (M), peak LR, token budget, steps.
PAPER_SIZES = {
    "s": dict(d=768, layers=12, heads=12, head_dim=64, params_m=110, lr=6e-4, tokens=2_200_000_000, steps=4196),
    "m": dict(d=1024, layers=24, heads=16, head_dim=64, params_m=335, lr=3e-4, tokens=6_700_000_000, steps=12779),
    "l": dict(d=1536, layers=24, heads=12, head_dim=128, params_m=729, lr=2.5e-4, tokens=14_580_000_000, steps=27809),
    "xl": dict(d=2048, layers=24, heads=16, head_dim=128, params_m=1274, lr=2e-4, tokens=25_500_000_000, steps=48637),
}
# The paper's settings table: (rank, blocks) per size, structure and ratio.
PAPER_SETTINGS = {
    ("s", "lowrank"): {"63": (384, None), "32": (192, None)},
    ("m", "lowrank"): {"63": (512, None), "32": (256, None)},
    ("l", "lowrank"): {"63": (768, None), "32": (384, None)},
    ("xl", "lowrank"): {"63": (1024, None), "32": (512, None)},
    ("s", "blockdense"): {"63": (512, 2), "32": (256, 2)},
    ("m", "blockdense"): {"63": (768, 4), "32": (384, 4)},
    ("l", "blockdense"): {"63": (1024, 2), "32": (512, 2)},
    ("xl", "blockdense"): {"63": (1536, 4), "32": (768, 4)},
    **{(size, "blockshuffle"): {"63": (None, 2), "32": (None, 4)} for size in PAPER_SIZES},
}
# Table 1 (Transformer-xl): FFN weight parameters in millions.
TABLE1_FFN_M = {
    "xl_dense": 805,
    "xl_lowrank63": 516,
    "xl_blockdense63": 486,
    "xl_blockshuffle63": 516,
    "xl_lowrank32": 275,
    "xl_blockdense32": 260,
    "xl_blockshuffle32": 275,
}


def load_run(path: Path) -> TrainConfig:
    return load_config(TrainConfig, path)


def ffn_weights_by_layer(model: ModelConfig) -> list[int]:
    """FFN weight parameters of each layer, from the per-layer structure and the closed-form counts."""
    out = []
    for layer in range(model.num_layers):
        kind = model.ffn.structure if model.ffn.is_structured(layer) else "dense"
        out.append(
            sum(counts.weight_params(kind, n, m, model.ffn.rank, model.ffn.blocks) for n, m in model.ffn_shapes())
        )
    return out


def paper_ratio_formula(structure: str, d: int, rank: int | None, blocks: int | None) -> float:
    """The method section's ratios for d -> 4d -> d, written out independently of the counts module."""
    if structure == "lowrank":
        return 1.25 * rank / d
    if structure == "blockshuffle":
        return 1.25 / blocks
    return 5 * rank * (1 + 1 / blocks) / (8 * d)


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_run_config_loads_and_fits_a_launch(path):
    cfg = load_run(path)
    assert resolved_train_steps(cfg) > 0
    cfg.validate_layout(world_size=1)
    cfg.validate_layout(world_size=2)


@pytest.mark.parametrize("path", sorted((CONFIGS / "paper").glob("*.yaml")), ids=lambda p: p.stem)
def test_paper_run_shards_over_tp2_pp2(path):
    """Every paper run fits a TP=2 x PP=2 layout (the structured FFNs included) on 8 devices."""
    cfg = load_config(TrainConfig, path, ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"])
    cfg.validate_layout(world_size=8)


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: p.name)
def test_model_config_holds_only_a_model(path):
    data = load_yaml_mapping(path)
    assert list(data) == ["model"], f"{path.name} should hold a model section only, found {list(data)}"
    from_dict(ModelConfig, data["model"], str(path))


@pytest.mark.parametrize("size", PAPER_SIZES)
def test_model_sizes_are_the_papers(size):
    ref = PAPER_SIZES[size]
    model = from_dict(ModelConfig, load_yaml_mapping(CONFIGS / "models" / f"{size}.yaml")["model"])
    assert (model.hidden_size, model.num_layers, model.num_attention_heads, model.kv_channels) == (
        ref["d"],
        ref["layers"],
        ref["heads"],
        ref["head_dim"],
    )
    assert model.ffn_hidden_size == 4 * ref["d"] and model.vocab_size == 32000 and model.seq_length == 1024
    assert model.ffn.structure == "dense" and model.tie_embeddings and model.activation == "gelu"
    assert round(count_parameters(model).total / 1e6) == ref["params_m"]


@pytest.mark.parametrize(
    "name, d, f, heads, kv_heads, rank, params_m",
    [("m_wide", 1024, 4864, 8, 4, 512, 219), ("l_wide", 1536, 7424, 12, 4, 768, 464)],
)
def test_wide_models_are_the_papers(name, d, f, heads, kv_heads, rank, params_m):
    model = from_dict(ModelConfig, load_yaml_mapping(CONFIGS / "models" / f"{name}.yaml")["model"])
    assert (model.hidden_size, model.ffn_hidden_size, model.num_attention_heads, model.num_query_groups) == (
        d,
        f,
        heads,
        kv_heads,
    )
    assert model.attention_width == heads * 64 == d // 2
    assert (model.ffn.structure, model.ffn.rank, model.ffn.dense_layers) == ("lowrank", rank, [0])
    assert round(count_parameters(model).total / 1e6) == params_m


def test_paper_run_set_is_complete():
    names = {p.stem for p in (CONFIGS / "paper").glob("*.yaml")}
    expected = {f"{size}_dense" for size in PAPER_SIZES}
    expected |= {f"{size}_{structure}{ratio}" for size, structure in PAPER_SETTINGS for ratio in ("63", "32")}
    expected |= {"m_wide", "l_wide"}
    assert names == expected


PAPER_RUNS = sorted(p for p in (CONFIGS / "paper").glob("*.yaml") if PAPER_NAME.fullmatch(p.stem))


@pytest.mark.parametrize("path", PAPER_RUNS, ids=lambda p: p.stem)
def test_paper_run_recipe(path):
    match = PAPER_NAME.fullmatch(path.stem)
    ref = PAPER_SIZES[match["size"]]
    cfg = load_run(path)
    opt, training = cfg.optimizer, cfg.training
    assert opt.lr == ref["lr"] and training.train_tokens == ref["tokens"]
    assert resolved_train_steps(cfg) == ref["steps"]
    assert resolved_warmup_steps(cfg) == int(0.1 * ref["steps"])
    assert (opt.adam_beta1, opt.adam_beta2, opt.adam_eps, opt.weight_decay, opt.clip_grad) == (
        0.9,
        0.999,
        1e-8,
        0.1,
        1.0,
    )
    assert (opt.decay_style, opt.min_lr_ratio, opt.warmup_fraction) == ("cosine", 0.1, 0.1)
    assert cfg.tokens_per_step() == 512 * 1024
    assert training.precision == "auto"
    assert cfg.run_dir == f"runs/paper/{path.stem}"


@pytest.mark.parametrize("path", PAPER_RUNS, ids=lambda p: p.stem)
def test_paper_structured_layers_have_the_claimed_ratio(path):
    match = PAPER_NAME.fullmatch(path.stem)
    model = load_run(path).model
    per_layer = ffn_weights_by_layer(model)
    dense_layer = 2 * model.hidden_size * model.ffn_hidden_size
    assert per_layer[0] == dense_layer  # layer 0 keeps its dense FFN
    if match["structure"] is None:
        assert model.ffn.structure == "dense" and set(per_layer) == {dense_layer}
        return
    rank, blocks = PAPER_SETTINGS[(match["size"], match["structure"])][match["ratio"]]
    assert (model.ffn.structure, model.ffn.rank, model.ffn.blocks) == (match["structure"], rank, blocks)
    assert model.ffn.dense_layers == [0]
    ratios = {w / dense_layer for w in per_layer[1:]}
    assert len(ratios) == 1
    (ratio,) = ratios
    assert ratio == pytest.approx(paper_ratio_formula(match["structure"], model.hidden_size, rank, blocks), rel=1e-12)
    # The paper's labels are nominal: BlockDense at B=4 is 58.6% / 29.3% under the "63%" / "32%" names.
    assert ratio == pytest.approx(int(match["ratio"]) / 100, rel=0.1)
    # The same run derived from the paper presets (ratio solver) must be the same model.
    assert model == preset(match["size"], structure=match["structure"], ratio=int(match["ratio"]) / 100)


@pytest.mark.parametrize("name, ffn_m", TABLE1_FFN_M.items())
def test_xl_ffn_parameters_match_table1(name, ffn_m):
    model = load_run(CONFIGS / "paper" / f"{name}.yaml").model
    assert round(sum(ffn_weights_by_layer(model)) / 1e6) == ffn_m


@pytest.mark.parametrize("name, preset_name", [("m_wide", "m-wide"), ("l_wide", "l-wide")])
def test_wide_runs(name, preset_name):
    cfg = load_run(CONFIGS / "paper" / f"{name}.yaml")
    budget = training_budget(preset_name)
    assert cfg.model == preset(preset_name)
    assert (cfg.optimizer.lr, cfg.training.train_tokens) == (budget.peak_lr, budget.tokens)
    assert resolved_train_steps(cfg) == budget.steps


def test_tiny_quickstart_configs():
    tiny = load_run(CONFIGS / "tiny.yaml")
    dense = load_run(CONFIGS / "tiny_dense.yaml")
    assert (tiny.data.path, tiny.data.tokenizer, tiny.run_dir) == ("data/prepared", "data/tokenizer.json", "runs/tiny")
    assert tiny.model.ffn.structure == "lowrank"
    ratio = ffn_weights_by_layer(tiny.model)[1] / (2 * tiny.model.hidden_size * tiny.model.ffn_hidden_size)
    assert ratio == pytest.approx(0.32, rel=0.1)
    assert 1e6 < count_parameters(tiny.model).total < 1e7
    assert dense.model.ffn.structure == "dense" and dense.run_dir == "runs/tiny_dense"
    # The dense baseline differs in the FFN and the run directory only.
    same = {k: v for k, v in vars(dense).items() if k not in ("model", "run_dir")}
    assert same == {k: v for k, v in vars(tiny).items() if k not in ("model", "run_dir")}
    assert vars(dense.model) | {"ffn": None} == vars(tiny.model) | {"ffn": None}
