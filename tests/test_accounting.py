"""Parameter/FLOP accounting, the ratio solver and the paper presets.

Published figures are written out here from "Building on Efficient
Foundations" (Wei et al., 2024) rather than read from the package, so a
change to the package's copies cannot make these tests agree with themselves.
Model-level counts are checked against independent references: the
``numel()`` and the FLOPs (``torch.utils.flop_counter``) of a reference GPT
built in this file from torch modules and the structured layers, and the
``numel()`` of megatron-core's own GPTModel.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from megatron_sffn.accounting import (
    count_parameters,
    dense_counterpart,
    ffn_param_ratio,
    forward_flops_per_token,
    guide_ffn_flops_per_token,
    model_flops_utilization,
    paper_ffn_sizes,
    solve_ffn_sizes,
    tokens_for_flops,
    training_flops_per_token,
    training_run_flops,
)
from megatron_sffn.accounting.presets import preset, settings_table, training_budget, with_structure
from megatron_sffn.config.model import FFNConfig, ModelConfig
from megatron_sffn.structured import build_linear

# --------------------------------------------------------------------------- Table 1

# (structure, ratio, R, B, params M, FFN params M, training FLOPs), Transformer-xl.
TABLE1 = [
    ("dense", None, None, None, 1274, 805, 2.10e20),
    ("lowrank", 0.63, 1024, None, 985, 516, 1.66e20),
    ("blockdense", 0.63, 1536, 4, 955, 486, 1.61e20),
    ("blockshuffle", 0.63, None, 2, 985, 516, 1.66e20),
    ("lowrank", 0.32, 512, None, 744, 275, 1.29e20),
    ("blockdense", 0.32, 768, 4, 728, 260, 1.27e20),
    ("blockshuffle", 0.32, None, 4, 744, 275, 1.29e20),
]


def _xl(structure: str, ratio: float | None) -> ModelConfig:
    return preset("xl", structure=None if structure == "dense" else structure, ratio=ratio)


@pytest.mark.parametrize("structure, ratio, rank, blocks, params_m, ffn_m, flops", TABLE1)
def test_table1_row(structure, ratio, rank, blocks, params_m, ffn_m, flops):
    cfg = _xl(structure, ratio)
    assert (cfg.ffn.rank, cfg.ffn.blocks) == (rank, blocks)
    params = count_parameters(cfg)
    assert round(params.total / 1e6) == params_m
    assert round(params.ffn_weights / 1e6) == ffn_m
    # xl trains 25.5B tokens; the whole steps actually run (48,637 x 524,288) give the same figures.
    for tokens in (25_500_000_000, 48_637 * 524_288):
        assert f"{training_run_flops(cfg, tokens).total:.2e}" == f"{flops:.2e}"


def test_table1_ffn_params_exclude_biases():
    # The paper's "FFN params" are weights only: with the FFN biases dense xl would round to 806M, not 805M.
    params = count_parameters(_xl("dense", None))
    assert round((params.ffn_weights + params.ffn_biases) / 1e6) == 806


# --------------------------------------------------------------------------- presets and budgets

# size: (params M, steps, peak LR, tokens)
BUDGETS = {
    "s": (110, 4196, 6e-4, 2.2e9),
    "m": (335, 12779, 3e-4, 6.7e9),
    "l": (729, 27809, 2.5e-4, 14.58e9),
    "xl": (1274, 48637, 2e-4, 25.5e9),
}


@pytest.mark.parametrize("size", list(BUDGETS))
def test_paper_sizes_budgets_and_steps(size):
    params_m, steps, lr, tokens = BUDGETS[size]
    dense_params = count_parameters(preset(size)).total
    assert round(dense_params / 1e6) == params_m
    budget = training_budget(size)
    assert (budget.tokens, budget.peak_lr, budget.steps) == (tokens, lr, steps)
    assert budget.batch_tokens == 524_288
    assert budget.trained_tokens == steps * 524_288 <= budget.tokens < (steps + 1) * 524_288
    # The budgets are the Chinchilla-style 20 tokens per dense parameter, rounded.
    assert budget.tokens == pytest.approx(20 * dense_params, rel=0.005)


@pytest.mark.parametrize(
    "size, heads, kv_heads, head_dim, layers",
    [("s", 12, 12, 64, 12), ("m", 16, 16, 64, 24), ("l", 12, 12, 128, 24), ("xl", 16, 16, 128, 24)],
)
def test_paper_size_shapes(size, heads, kv_heads, head_dim, layers):
    cfg = preset(size)
    assert (cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels, cfg.num_layers) == (
        heads,
        kv_heads,
        head_dim,
        layers,
    )
    assert cfg.ffn_hidden_size == 4 * cfg.hidden_size
    assert (cfg.vocab_size, cfg.seq_length, cfg.tie_embeddings, cfg.activation) == (32000, 1024, True, "gelu")
    assert cfg.ffn.structure == "dense"


@pytest.mark.parametrize(
    "name, base, params_m, attention_width, heads, kv_heads, rank, tokens",
    [("m-wide", "m", 219, 512, 8, 4, 512, 10.6e9), ("l-wide", "l", 464, 768, 12, 4, 768, 23.4e9)],
)
def test_wide_and_structured_presets(name, base, params_m, attention_width, heads, kv_heads, rank, tokens):
    cfg = preset(name)
    assert (cfg.attention_width, cfg.num_attention_heads, cfg.num_query_groups) == (attention_width, heads, kv_heads)
    assert (cfg.ffn.structure, cfg.ffn.rank, cfg.ffn.dense_layers) == ("lowrank", rank, [0])
    assert round(count_parameters(cfg).total / 1e6) == params_m
    # They train on the tokens that give the dense base model's training FLOPs (paper: 10.6B / 23.4B).
    dense_flops = training_run_flops(preset(base), training_budget(base).tokens).total
    assert float(f"{tokens_for_flops(cfg, dense_flops):.3g}") == tokens == training_budget(name).tokens


def test_settings_table_matches_paper():
    expected = {
        "s": ((384, 192), 2, (512, 256), (2, 4)),
        "m": ((512, 256), 4, (768, 384), (2, 4)),
        "l": ((768, 384), 2, (1024, 512), (2, 4)),
        "xl": ((1024, 512), 4, (1536, 768), (2, 4)),
    }
    rows = settings_table()
    assert [r.size for r in rows] == list(expected)
    for row in rows:
        got = (row.lowrank_rank, row.blockdense_blocks, row.blockdense_rank, row.blockshuffle_blocks)
        assert got == expected[row.size], row.size


def test_preset_overrides_and_explicit_sizes():
    cfg = preset("s", structure="blockdense", rank=256, blocks=4, seq_length=2048)
    assert (cfg.ffn.structure, cfg.ffn.rank, cfg.ffn.blocks, cfg.seq_length) == ("blockdense", 256, 4, 2048)
    # A SwiGLU override is solved on its real shapes (fc1 d -> 2f), not on the GELU ones.
    swiglu = preset("xl", structure="lowrank", ratio=0.32, activation="swiglu")
    achieved = ffn_param_ratio("lowrank", 2048, 8192, rank=swiglu.ffn.rank, gated=True)
    assert abs(achieved / 0.32 - 1) <= 0.1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="xxl"), r"unknown model preset 'xxl'"),
        (dict(name="s", ratio=0.32), r"without a structure"),
        (dict(name="s", structure="dense", ratio=0.32), r"ratio=0.32"),
        (dict(name="s", structure="lowrank", ratio=0.32, rank=64), r"rank=64"),
        (dict(name="s", structure="blockshuffle", rank=64, blocks=2), r"rank=64 does not apply"),
        (dict(name="m-wide", structure="blockdense", ratio=0.32), r"no paper BlockDense block count"),
        (dict(name="s", structure="lowrank", rank=64, hidden=3), r"unknown ModelConfig fields \['hidden'\]"),
    ],
)
def test_preset_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        preset(kwargs.pop("name"), **kwargs)


# --------------------------------------------------------------------------- ratio solver


@pytest.mark.parametrize("d", [512, 768, 2048])
def test_ratio_formulas_for_f_equal_4d(d):
    f = 4 * d
    for rank in (d // 4, d // 2):
        assert ffn_param_ratio("lowrank", d, f, rank=rank) == pytest.approx(1.25 * rank / d)
        for blocks in (2, 4):
            expected = 5 * rank * (1 + 1 / blocks) / (8 * d)
            assert ffn_param_ratio("blockdense", d, f, rank=rank, blocks=blocks) == pytest.approx(expected)
    for blocks in (2, 4, 8):
        assert ffn_param_ratio("blockshuffle", d, f, blocks=blocks) == pytest.approx(1.25 / blocks)


def test_solver_on_a_non_4d_ffn():
    # d=1024, f=4864 (m-wide): LowRank ratio = R (d + f) / (d f), nothing assumes f = 4d.
    d, f = 1024, 4864
    sizes = solve_ffn_sizes("lowrank", d, f, 0.6)
    assert sizes.rank == round(0.6 * d * f / (d + f))
    assert sizes.achieved_ratio == pytest.approx(sizes.rank * (d + f) / (d * f))
    assert paper_ffn_sizes("lowrank", d, f, 0.6).rank == 512  # the wide m model's R


def test_solver_respects_divisibility_and_multiples():
    sizes = solve_ffn_sizes("blockdense", 1536, 6144, 0.4, blocks=3)
    assert sizes.rank % 3 == 0
    sizes = solve_ffn_sizes("lowrank", 2048, 8192, 0.45, rank_multiple=256)
    assert sizes.rank % 256 == 0 and sizes.rank == 768
    sizes = solve_ffn_sizes("blockdense", 2048, 8192, 0.5, blocks=4, rank_multiple=96)
    assert sizes.rank % 96 == 0 and sizes.rank <= 2048
    # BlockShuffle picks among block counts dividing both d and f; 1.25/B = 0.156 -> B = 8.
    sizes = solve_ffn_sizes("blockshuffle", 1024, 4096, 0.16)
    assert (sizes.blocks, sizes.rank) == (8, None)


def test_paper_rule_falls_back_below_256_only_when_needed():
    # d=768, 32% LowRank: multiples of 256 and 128 both round to R=256 (41.7%), so 64 is used.
    assert paper_ffn_sizes("lowrank", 768, 3072, 0.32).rank == 192
    # d=2048, 63% BlockDense B=4: 1536 (58.6%) is a multiple of 256 and within tolerance, kept over 1664 (63.5%).
    sizes = paper_ffn_sizes("blockdense", 2048, 8192, 0.63, blocks=4)
    assert sizes.rank == 1536 and sizes.achieved_ratio == pytest.approx(0.5859375)
    assert solve_ffn_sizes("blockdense", 2048, 8192, 0.63, blocks=4).rank == 1652


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        (("lowrank", 768, 3072, 1.2), {}, r"ratio=1.2 is unreachable; expected 0 < ratio <= 1"),
        (("lowrank", 768, 3072, 0.0), {}, r"ratio=0.0 is unreachable"),
        (("blockshuffle", 768, 3072, -0.3), {}, r"ratio=-0.3"),
        (("blockshuffle", 768, 3072, 0.5), {}, r"ratio=0.5 is unreachable within 10% for d=768, f=3072.*blocks=3"),
        (("blockdense", 2048, 8192, 0.95), {"blocks": 4}, r"ratio=0.95.*d=2048, f=8192.*rank=2048, blocks=4"),
        (("blockdense", 2048, 8192, 0.32), {}, r"blocks is required.*ratio=0.32"),
        (("blockdense", 1000, 4000, 0.32), {"blocks": 3}, r"in_features=1000 is not divisible by blocks=3"),
        (("blockshuffle", 1024, 4096, 0.32), {"blocks": 3}, r"in_features=1024 is not divisible by blocks=3"),
        (("lowrank", 768, 3072, 0.32), {"blocks": 2}, r"blocks=2 does not apply"),
        (("blockshuffle", 768, 3072, 0.32), {"rank_multiple": 256}, r"rank_multiple=256"),
        (("lowrank", 64, 256, 0.32), {"rank_multiple": 128}, r"no R is a multiple of 128.*min\(d=64, f=256\)=64"),
        (("dense", 64, 256, 0.32), {}, r"cannot solve sizes for structure 'dense'"),
    ],
)
def test_solver_errors_name_the_values(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        solve_ffn_sizes(*args, **kwargs)


def test_paper_rule_error_lists_what_was_tried():
    with pytest.raises(ValueError, match=r"no rank reaches ratio=0.001.*multiple 1: rank=1"):
        paper_ffn_sizes("lowrank", 64, 256, 0.001)


# --------------------------------------------------------------------------- independent reference model


class ReferenceGPT(nn.Module):
    """The paper's GPT written out with torch modules and the structured layers (no megatron, no accounting)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, heads, groups, head_dim = cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
        fc1_out = cfg.ffn_hidden_size * (2 if cfg.activation == "swiglu" else 1)
        self.embedding = nn.Embedding(cfg.vocab_size, d)
        self.layers = nn.ModuleList()
        for layer in range(cfg.num_layers):
            kind = cfg.ffn.structure if cfg.ffn.is_structured(layer) else "dense"
            sizes = {"rank": cfg.ffn.rank, "blocks": cfg.ffn.blocks} if kind != "dense" else {}
            block = nn.ModuleDict(
                {
                    "ln1": nn.LayerNorm(d),
                    "qkv": nn.Linear(d, (heads + 2 * groups) * head_dim),
                    "proj": nn.Linear(heads * head_dim, d),
                    "ln2": nn.LayerNorm(d),
                    "fc1": build_linear(kind, d, fc1_out, **sizes),
                    "fc2": build_linear(kind, cfg.ffn_hidden_size, d, **sizes),
                }
            )
            self.layers.append(block)
        self.final_ln = nn.LayerNorm(d)
        self.output = None if cfg.tie_embeddings else nn.Linear(d, cfg.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        heads, groups, head_dim = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
        batch, seq = tokens.shape
        x = self.embedding(tokens)
        for block in self.layers:
            q, k, v = block["qkv"](block["ln1"](x)).split([heads * head_dim, groups * head_dim, groups * head_dim], -1)
            q = q.view(batch, seq, heads, head_dim).transpose(1, 2)
            k = k.view(batch, seq, groups, head_dim).transpose(1, 2).repeat_interleave(heads // groups, dim=1)
            v = v.view(batch, seq, groups, head_dim).transpose(1, 2).repeat_interleave(heads // groups, dim=1)
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(head_dim)
            mask = torch.ones(seq, seq, dtype=torch.bool).triu(1)
            attn = torch.matmul(scores.masked_fill(mask, float("-inf")).softmax(-1), v)
            x = x + block["proj"](attn.transpose(1, 2).reshape(batch, seq, heads * head_dim))
            h = block["fc1"](block["ln2"](x))
            if cfg.activation == "swiglu":
                gate, value = h.chunk(2, dim=-1)
                h = F.silu(gate) * value
            else:
                h = F.gelu(h, approximate="tanh")
            x = x + block["fc2"](h)
        x = self.final_ln(x)
        return x @ self.embedding.weight.t() if self.output is None else self.output(x)

    def ffn_weight_numel(self) -> int:
        return sum(
            p.numel()
            for block in self.layers
            for name in ("fc1", "fc2")
            for pname, p in block[name].named_parameters()
            if pname != "bias"
        )


TINY_STRUCTURES = [
    FFNConfig(),
    FFNConfig("lowrank", rank=8),
    FFNConfig("blockdense", rank=8, blocks=2),
    FFNConfig("blockshuffle", blocks=4),
    FFNConfig("lowrank", rank=12, dense_layers=[1]),
]


@pytest.mark.parametrize("ffn", TINY_STRUCTURES, ids=lambda f: f"{f.structure}-{f.dense_layers}")
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_counts_match_reference_model(ffn, activation, tie):
    # GQA (4 query heads on 2 KV heads) with head_dim 12, so the attention width 48 differs from d=32.
    cfg = ModelConfig(
        hidden_size=32,
        num_layers=3,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=12,
        ffn_hidden_size=64,
        vocab_size=50,
        seq_length=8,
        activation=activation,
        tie_embeddings=tie,
        ffn=ffn,
    )
    model = ReferenceGPT(cfg)
    params = count_parameters(cfg)
    assert params.total == sum(p.numel() for p in model.parameters())
    assert params.ffn_weights == model.ffn_weight_numel()

    batch = 3
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_length))
    with FlopCounterMode(display=False) as counter:
        model(tokens)
    assert forward_flops_per_token(cfg).total * batch * cfg.seq_length == counter.get_total_flops()


def test_gqa_reduces_only_kv_projections():
    mha = ModelConfig(hidden_size=64, num_layers=2, num_attention_heads=8)
    gqa = ModelConfig(hidden_size=64, num_layers=2, num_attention_heads=8, num_query_groups=2)
    saved = count_parameters(mha).attention - count_parameters(gqa).attention
    assert saved == 2 * 2 * (64 * (64 - 16) + (64 - 16))  # layers x (k, v) x (weights + biases) of 6 of 8 heads
    flops = {name: forward_flops_per_token(cfg).attention_projections for name, cfg in (("mha", mha), ("gqa", gqa))}
    flops_saved = flops["mha"] - flops["gqa"]
    assert flops_saved == 2 * 2 * 2 * 64 * (64 - 16)


# --------------------------------------------------------------------------- megatron-core's GPTModel


def megatron_gpt_numels(configs: list[dict]) -> list[dict[str, int]]:
    """torchrun check: build megatron-core's GPTModel (local spec) for each config and count its parameters."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(1, 1)
    results = []
    for fields in configs:
        cfg = ModelConfig(**fields)
        swiglu = cfg.activation == "swiglu"
        tcfg = TransformerConfig(
            num_layers=cfg.num_layers,
            hidden_size=cfg.hidden_size,
            num_attention_heads=cfg.num_attention_heads,
            num_query_groups=cfg.num_query_groups,
            kv_channels=cfg.kv_channels,
            ffn_hidden_size=cfg.ffn_hidden_size,
            gated_linear_unit=swiglu,
            activation_func=F.silu if swiglu else F.gelu,
            add_bias_linear=True,
            normalization="LayerNorm",
            use_cpu_initialization=True,
            bias_activation_fusion=False,
            masked_softmax_fusion=False,
            bias_dropout_fusion=False,
            persist_layer_norm=False,
            gradient_accumulation_fusion=False,
            apply_rope_fusion=False,
        )
        model = GPTModel(
            tcfg,
            get_gpt_layer_local_spec(),
            vocab_size=cfg.vocab_size,
            max_sequence_length=cfg.seq_length,
            position_embedding_type="rope",
            share_embeddings_and_output_weights=cfg.tie_embeddings,
        )
        ffn = sum(p.numel() for n, p in model.named_parameters() if ".mlp.linear_fc" in n and n.endswith("weight"))
        results.append({"total": sum(p.numel() for p in model.parameters()), "ffn_weights": ffn})
    return results


@pytest.mark.multiproc
def test_dense_counts_match_megatron_gpt_model():
    from tests.mp_harness import launch

    configs = [
        dict(hidden_size=64, num_layers=2, num_attention_heads=4, vocab_size=100, seq_length=32),
        dict(
            hidden_size=64,
            num_layers=3,
            num_attention_heads=4,
            num_query_groups=2,
            kv_channels=24,
            ffn_hidden_size=96,
            activation="swiglu",
            tie_embeddings=False,
            vocab_size=100,
            seq_length=32,
        ),
        dict(
            hidden_size=48,
            num_layers=2,
            num_attention_heads=6,
            num_query_groups=3,
            vocab_size=77,
            seq_length=16,
            activation="swiglu",
        ),
    ]
    run = launch(
        "tests.test_accounting", ["megatron_gpt_numels"], nproc=1, kwargs={"megatron_gpt_numels": {"configs": configs}}
    )
    built = run.results[0]["megatron_gpt_numels"]
    for fields, numels in zip(configs, built):
        params = count_parameters(ModelConfig(**fields))
        assert (params.total, params.ffn_weights) == (numels["total"], numels["ffn_weights"]), fields


# --------------------------------------------------------------------------- training FLOPs, SGT, MFU


def test_training_is_three_forwards_and_extra_compute_adds():
    cfg = preset("m", structure="lowrank", ratio=0.32)
    assert training_flops_per_token(cfg) == 3 * forward_flops_per_token(cfg).total
    run = training_run_flops(cfg, 1000, extra_forward_flops=500.0)
    assert run.model == 3 * forward_flops_per_token(cfg).total * 1000 and run.extra == 1500.0
    assert run.total == run.model + run.extra
    with pytest.raises(ValueError, match="tokens=-1"):
        training_run_flops(cfg, -1)


def test_guide_cost_is_dense_ffn_of_structured_layers():
    cfg = preset("s", structure="blockshuffle", ratio=0.32)
    dense_ffn = forward_flops_per_token(dense_counterpart(cfg)).ffn
    assert guide_ffn_flops_per_token(cfg) == dense_ffn * 11 / 12  # layer 0 is dense and has no guide
    assert guide_ffn_flops_per_token(preset("s")) == 0


# Same-FLOPs self-guided training (paper): S + g steps with g = ratio x S, guides on for ratio x S
# steps at an expected half cost, matching dense FLOPs. 32% models.
SGT_RATIOS = {
    "lowrank": (0.30, 0.38, 0.41, 0.43),
    "blockshuffle": (0.30, 0.38, 0.41, 0.43),
    "blockdense": (0.30, 0.40, 0.41, 0.45),
}


@pytest.mark.parametrize("structure", list(SGT_RATIOS))
def test_accounting_reproduces_sgt_equal_flops_ratios(structure):
    def relative_excess(size: str, r: float) -> float:
        cfg = preset(size, structure=structure, ratio=0.32)
        tokens = training_budget(size).trained_tokens
        guide = 0.5 * r * tokens * guide_ffn_flops_per_token(cfg)
        structured = training_run_flops(cfg, round((1 + r) * tokens), extra_forward_flops=guide).total
        return structured / training_run_flops(preset(size), tokens).total - 1

    for size, r in zip(("s", "m", "l", "xl"), SGT_RATIOS[structure]):
        excess = relative_excess(size, r)
        assert abs(excess) < 0.005, (size, r, excess)
        # ... and the published ratio is the two-decimal one closest to equal FLOPs.
        assert abs(excess) < min(abs(relative_excess(size, r - 0.01)), abs(relative_excess(size, r + 0.01)))


def test_mfu_uses_the_structured_count():
    dense, lowrank = preset("xl"), preset("xl", structure="lowrank", ratio=0.32)
    peak = 989e12
    tokens_per_second = 20_000.0
    assert model_flops_utilization(dense, tokens_per_second, peak) == pytest.approx(
        3 * forward_flops_per_token(dense).total * tokens_per_second / peak
    )
    # Same throughput, fewer FLOPs per token: MFU falls by exactly the FLOP ratio (1.29e20 / 2.10e20 in Table 1).
    mfu = {
        name: model_flops_utilization(cfg, tokens_per_second, peak) for name, cfg in (("dense", dense), ("lr", lowrank))
    }
    ratio = mfu["lr"] / mfu["dense"]
    assert ratio == pytest.approx(training_flops_per_token(lowrank) / training_flops_per_token(dense))
    assert 0.60 < ratio < 0.63
    with pytest.raises(ValueError, match="peak_flops_per_second=0"):
        model_flops_utilization(dense, tokens_per_second, 0)


def test_with_structure_keeps_dense_layers_and_validates():
    base = ModelConfig(hidden_size=256, num_layers=4, num_attention_heads=4, ffn=FFNConfig(dense_layers=[0, 3]))
    cfg = with_structure(base, "lowrank", ratio=0.32)
    assert cfg.ffn.dense_layers == [0, 3] and cfg.ffn.rank == 64
    assert count_parameters(cfg).ffn_weights == 2 * 2 * 256 * 1024 + 2 * 2 * (256 + 1024) * 64
    with pytest.raises(ValueError, match="rank_multiple=8 only applies"):
        with_structure(base, "lowrank", rank=64, rank_multiple=8)
    with pytest.raises(ValueError, match="unknown structure 'sparse'"):
        with_structure(base, "sparse", rank=64)
