"""Tensor-parallel structured FFNs in one process: layouts, references, costs, errors.

Multi-rank layouts are built one rank at a time with a :class:`ShapeOnlyGroup`
(the modules hold real weights; collectives only return the right shapes), so
everything here runs without torchrun.  The numerical TP=2 vs TP=1 proofs and
checkpoint resharding are in ``test_tp_structured_mp.py``.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from megatron_sffn.config import FFNConfig, ModelConfig
from megatron_sffn.parallel.comm import ShapeOnlyGroup
from megatron_sffn.parallel.grads import TP_AVERAGED
from megatron_sffn.parallel.layout import TPLayout, padded_tokens, shard_ranges
from megatron_sffn.parallel.mlp_spec import STRUCTURED_LINEARS, mlp_spec
from megatron_sffn.parallel.plan import (
    FFNShape,
    TPStrategy,
    candidate_strategies,
    choose_strategy,
    dense_equivalent,
    rank_cost,
    require_shardable,
)
from megatron_sffn.structured import build_linear, counts
from tests.workers.tp_structured import (
    CASES,
    FFN_HIDDEN,
    HIDDEN,
    SEED,
    Case,
    build_mlp,
    expected_cost,
    inputs,
    measure,
    transformer_config,
)

STRUCTURED_CASES = [c for c in CASES if c.structure != "dense"]

# -- layout -----------------------------------------------------------------------


def test_shard_ranges_partition_every_part():
    for total, stride, tp in [(12, 1, 3), (16, 2, 4), (8, 2, 2)]:
        owners = torch.full((total,), -1)
        for rank in range(tp):
            for piece in shard_ranges(total, TPLayout(rank, tp), stride):
                assert (owners[piece] == -1).all()
                owners[piece] = rank
        assert (owners >= 0).all()
        # each of the `stride` parts is cut in tp contiguous, rank-ordered chunks
        assert owners.view(stride, tp, -1).eq(torch.arange(tp)[None, :, None]).all()


def test_padding_rounds_tokens_up_to_the_group_size():
    assert [padded_tokens(t, 4) for t in (1, 4, 5, 15)] == [4, 4, 8, 16]


# -- TP=1 equals the pure layers ------------------------------------------------------


def _pure_layers(case: Case) -> tuple[torch.nn.Module, torch.nn.Module]:
    """fc1 and fc2 as pure layers with the MLP's draw order and seed."""
    sizes = {"rank": case.rank, "blocks": case.blocks}
    torch.manual_seed(SEED)
    fc1 = build_linear(case.structure, HIDDEN, FFN_HIDDEN * (2 if case.gated else 1), **sizes)
    fc2 = build_linear(case.structure, FFN_HIDDEN, HIDDEN, **sizes)
    return fc1, fc2


def _pure_ffn(case: Case, x: torch.Tensor) -> torch.Tensor:
    fc1, fc2 = _pure_layers(case)
    h = fc1(x)
    if case.gated:
        gate, value = h.chunk(2, dim=-1)
        h = F.silu(gate) * value
    else:
        h = F.gelu(h, approximate="tanh")
    return fc2(h)


@pytest.mark.parametrize("case", STRUCTURED_CASES, ids=lambda c: c.name)
def test_single_rank_mlp_equals_pure_layers(case):
    mlp = build_mlp(case, ShapeOnlyGroup(0, 1))
    x, _ = inputs((5, 3))
    out, bias = mlp(x)
    torch.testing.assert_close(out + bias, _pure_ffn(case, x), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", STRUCTURED_CASES, ids=lambda c: c.name)
def test_single_rank_merged_shard_is_the_exact_dense_matrix(case):
    """Pre-merge at TP=1: the merged matrix is ``to_dense()``, stays out of the state dict, switches per call."""
    mlp = build_mlp(case, ShapeOnlyGroup(0, 1))
    x, _ = inputs((5, 3))
    structured_out = mlp(x)[0]
    for layer, pure in zip((mlp.linear_fc1, mlp.linear_fc2), _pure_layers(case), strict=True):
        extra = layer.attach_merged(threshold=15)
        torch.testing.assert_close(layer.merged, pure.to_dense(), rtol=1e-5, atol=1e-6)
        assert extra == pure.to_dense().numel() * 4
        assert layer.uses_merged(15) and not layer.uses_merged(16)
    assert not any("merged" in key for key in mlp.state_dict())
    torch.testing.assert_close(mlp(x)[0], structured_out, rtol=1e-5, atol=1e-6)  # 15 tokens: merged
    for layer in (mlp.linear_fc1, mlp.linear_fc2):
        layer.merge_threshold = 14
    assert torch.equal(mlp(x)[0], structured_out)  # 15 tokens > 14: the factors, as before the merge


# -- shards of all ranks rebuild the full factors ----------------------------------------


def _splittable(case: Case, tp: int) -> bool:
    try:
        require_shardable(case.shape(), tp)
    except ValueError:
        return False
    return True


# Each structured case at TP=2 and TP=4 where its blocks allow (errors are tested below).
SPLIT_CASES = [
    pytest.param(c, tp, id=f"{c.name}-tp{tp}") for c in STRUCTURED_CASES for tp in (2, 4) if _splittable(c, tp)
]


@pytest.mark.parametrize("case, tp", SPLIT_CASES)
def test_rank_shards_rebuild_the_full_factors(case, tp):
    full = build_mlp(case, ShapeOnlyGroup(0, 1))
    ranks = [build_mlp(case, ShapeOnlyGroup(r, tp)) for r in range(tp)]
    for role in ("linear_fc1", "linear_fc2"):
        for name, whole in getattr(full, role).named_parameters():
            params = [dict(getattr(m, role).named_parameters())[name] for m in ranks]
            if not getattr(params[0], "tensor_model_parallel", False):
                for p in params:
                    torch.testing.assert_close(p, whole, rtol=0, atol=0)
                continue
            axis, stride = params[0].partition_dim, params[0].partition_stride
            rebuilt = torch.full_like(whole, float("nan"))
            for rank, p in enumerate(params):
                offset = 0
                for piece in shard_ranges(whole.shape[axis], TPLayout(rank, tp), stride):
                    width = piece.stop - piece.start
                    target = rebuilt.narrow(axis, piece.start, width)
                    assert target.isnan().all(), f"{role}.{name}: ranks overlap"
                    target.copy_(p.detach().narrow(axis, offset, width))
                    offset += width
                assert offset == p.shape[axis]
            torch.testing.assert_close(rebuilt, whole.detach(), rtol=0, atol=0)


def test_parameter_flags_follow_placement():
    """Sharded factors carry megatron's TP marks; token-split ones the TP-averaging flag; replicated neither."""
    mlp = build_mlp(Case("lowrank", rank=8), ShapeOnlyGroup(1, 2))
    fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
    assert str(fc1.strategy) == "split/token"
    assert fc1.u.tensor_model_parallel and fc1.u.partition_dim == 0
    assert fc2.v.tensor_model_parallel and fc2.v.partition_dim == 1
    for token_split in (fc1.v, fc2.u):
        assert getattr(token_split, TP_AVERAGED) and not hasattr(token_split, "tensor_model_parallel")
    replicated = build_mlp(Case("lowrank", rank=8, strategy="replicated/replicated"), ShapeOnlyGroup(1, 2))
    for p in (replicated.linear_fc1.v, replicated.linear_fc2.u, replicated.linear_fc2.bias):
        assert not hasattr(p, TP_AVERAGED) and not hasattr(p, "tensor_model_parallel")


# -- per-rank cost: measured from the modules, against the plan and the 1/tp share ---------------

# Factors a strategy replicates on every rank (full FLOPs each), restated from the design.
REPLICATED_FACTORS = {
    ("lowrank", "fc1_in"): lambda s: s.rank * s.hidden,
    ("lowrank", "fc2_out"): lambda s: s.hidden * s.rank,
    ("blockdense", "fc1_in"): lambda s: s.rank * s.hidden // s.blocks,
    ("blockshuffle", "fc1_in"): lambda s: s.hidden * s.hidden // s.blocks,
}


def _documented_overhead(shape: FFNShape, strategy: TPStrategy, tp: int) -> Fraction:
    numel = 0
    if strategy.fc1_in == "replicated":
        numel += REPLICATED_FACTORS[shape.kind, "fc1_in"](shape)
    if strategy.fc2_out == "replicated":
        numel += REPLICATED_FACTORS[shape.kind, "fc2_out"](shape)
    return 2 * numel * Fraction(tp - 1, tp)


@pytest.mark.parametrize("case, tp", SPLIT_CASES)
def test_rank_flops_are_a_tp_share_plus_documented_overhead(case, tp):
    shape = case.shape()
    total = 2 * (
        counts.weight_params(case.structure, HIDDEN, shape.fc1_out, case.rank, case.blocks)
        + counts.weight_params(case.structure, FFN_HIDDEN, HIDDEN, case.rank, case.blocks)
    )
    for rank in range(tp):
        mlp = build_mlp(case, ShapeOnlyGroup(rank, tp))
        measured = measure(mlp, (4, 4))
        strategy = mlp.linear_fc1.strategy
        assert measured["forward_flops"] == Fraction(total, tp) + _documented_overhead(shape, strategy, tp)
        assert measured["backward_flops"] == 2 * measured["forward_flops"]
        assert measured == expected_cost(case, mlp, tp)


def test_traffic_of_the_token_split_lowrank_pair():
    """2R + d elements per token each way, in units of (tp-1)/tp (plan docstring)."""
    case = Case("lowrank", rank=8)
    measured = measure(build_mlp(case, ShapeOnlyGroup(0, 4)), (4, 4))
    assert measured["forward_comm"] == measured["backward_comm"] == Fraction(3, 4) * (2 * 8 + HIDDEN)


# -- automatic strategy ---------------------------------------------------------------------

PAPER_FFNS = [  # (d, LowRank R, BlockDense (B, R), BlockShuffle B) at 63% and 32%, structured-ffn spec
    (768, (384, 192), ((2, 512), (2, 256)), (2, 4)),
    (1024, (512, 256), ((4, 768), (4, 384)), (2, 4)),
    (1536, (768, 384), ((2, 1024), (2, 512)), (2, 4)),
    (2048, (1024, 512), ((4, 1536), (4, 768)), (2, 4)),
]


def _paper_shapes():
    for d, lowrank, blockdense, blockshuffle in PAPER_FFNS:
        for i in range(2):
            yield FFNShape("lowrank", d, 4 * d, rank=lowrank[i])
            yield FFNShape("blockdense", d, 4 * d, rank=blockdense[i][1], blocks=blockdense[i][0])
            yield FFNShape("blockshuffle", d, 4 * d, blocks=blockshuffle[i])


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_auto_strategy_is_the_cheapest_within_dense_traffic(tp):
    for shape in _paper_shapes():
        if shape.blocks and shape.blocks % tp:
            continue
        dense = rank_cost(dense_equivalent(shape), None, tp)
        chosen = choose_strategy(shape, tp)
        cost = rank_cost(shape, chosen, tp)
        assert cost.forward_comm <= dense.forward_comm and cost.backward_comm <= dense.backward_comm
        feasible = [
            rank_cost(shape, s, tp)
            for s in candidate_strategies(shape.kind)
            if rank_cost(shape, s, tp).forward_comm <= dense.forward_comm
            and rank_cost(shape, s, tp).backward_comm <= dense.backward_comm
        ]
        assert cost.forward_flops == min(c.forward_flops for c in feasible)


def test_auto_strategy_matches_the_documented_choices():
    xl = 2048
    assert str(choose_strategy(FFNShape("lowrank", xl, 4 * xl, rank=1024), 2)) == "split/token"
    assert str(choose_strategy(FFNShape("blockdense", xl, 4 * xl, rank=768, blocks=4), 2)) == "split/token"
    bd63 = FFNShape("blockdense", xl, 4 * xl, rank=1536, blocks=4)
    assert str(choose_strategy(bd63, 2)) == "replicated/token"
    assert str(choose_strategy(bd63, 4)) == "split/token"
    bs = FFNShape("blockshuffle", xl, 4 * xl, blocks=2)
    whole = rank_cost(bs, choose_strategy(bs, 1), 1).forward_flops
    dense = rank_cost(dense_equivalent(bs), None, 2)
    # split: exact half the FLOPs, but the gathered middle vector exceeds the dense forward traffic by d/2
    split = rank_cost(bs, TPStrategy("split", "reduce"), 2)
    assert split.forward_flops == whole / 2 and split.forward_comm == dense.forward_comm + xl // 2
    # replicated: within dense traffic, W1 (d*d/B weights) computed whole on both ranks
    assert str(choose_strategy(bs, 2)) == "replicated/reduce"
    replicated = rank_cost(bs, TPStrategy("replicated", "reduce"), 2)
    assert replicated.forward_flops == whole / 2 + 2 * xl * xl // 2 // 2
    assert (replicated.forward_comm, replicated.backward_comm) == (dense.forward_comm, dense.backward_comm)
    assert str(choose_strategy(bs, 2, override="split/reduce")) == "split/reduce"


# -- spec factory -------------------------------------------------------------------------------


def test_spec_factory_keeps_layer_zero_dense_and_passes_structure_options():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    cfg = ModelConfig(
        hidden_size=HIDDEN,
        num_layers=3,
        num_attention_heads=2,
        ffn=FFNConfig(structure="blockdense", rank=8, blocks=2, init="normal"),
    )
    dense = mlp_spec(cfg, 0)
    assert dense.submodules.linear_fc1 is ColumnParallelLinear and dense.submodules.linear_fc2 is RowParallelLinear
    structured = mlp_spec(cfg, 2, tp_strategy="replicated/reduce")
    fc1, fc2 = structured.submodules.linear_fc1, structured.submodules.linear_fc2
    assert (fc1.module, fc2.module) == STRUCTURED_LINEARS["blockdense"]
    assert fc1.params == {"rank": 8, "blocks": 2, "init": "normal", "std": 0.02, "tp_strategy": "replicated/reduce"}


# -- errors -------------------------------------------------------------------------------------


def _build(case: Case, tp: int, **config_overrides):
    return build_mlp(case, ShapeOnlyGroup(0, tp), **config_overrides)


@pytest.mark.parametrize(
    "case, tp, message",
    [
        (
            Case("blockdense", rank=12, blocks=4),
            8,
            "blockdense: blocks=4 is not divisible by tensor_model_parallel_size=8",
        ),
        (Case("blockshuffle", blocks=2), 4, "blockshuffle: blocks=2 is not divisible by tensor_model_parallel_size=4"),
        (
            Case("blockshuffle", blocks=8),
            8,
            "blockshuffle: hidden_size/blocks=4 is not divisible by tensor_model_parallel_size=8",
        ),
        (Case("lowrank", rank=8), 3, "ffn_hidden_size=128 is not divisible by tensor_model_parallel_size=3"),
        (Case("lowrank", rank=8, strategy="split/reduce"), 2, "lowrank: tp_strategy='split/reduce'; expected"),
    ],
    ids=["blocks", "blockshuffle-blocks", "blockshuffle-width", "ffn-hidden", "strategy"],
)
def test_unsplittable_layouts_are_named(case, tp, message):
    with pytest.raises(ValueError, match=message.replace("*", r"\*")):
        _build(case, tp)


def test_unsupported_megatron_options_are_named():
    case = Case("lowrank", rank=8)
    fc1 = STRUCTURED_LINEARS["lowrank"][0]
    config = transformer_config(case)
    with pytest.raises(ValueError, match="is_expert=True"):
        fc1(HIDDEN, FFN_HIDDEN, config=config, rank=8, is_expert=True, tp_group=ShapeOnlyGroup(0, 1))
    with pytest.raises(ValueError, match="gather_output=True"):
        fc1(HIDDEN, FFN_HIDDEN, config=config, rank=8, gather_output=True, tp_group=ShapeOnlyGroup(0, 1))
    with pytest.raises(ValueError, match="sequence_parallel=True"):
        _build(case, 2, sequence_parallel=True, tensor_model_parallel_size=2)


# -- the documented xl table ---------------------------------------------------------------------


def test_documented_xl_table_is_the_plan():
    """docs/tensor-parallel.md's table equals the closed-form plan (the benchmark checks the modules against it)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "tp_per_rank.py"
    spec = importlib.util.spec_from_file_location("tp_per_rank", path)
    bench = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(bench)
    rows = [bench.planned(setting, tp) for setting in bench.SETTINGS for tp in bench.TP_SIZES]
    assert bench.check_against_docs(rows) == []
