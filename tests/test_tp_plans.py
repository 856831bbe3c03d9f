"""The structure registry: one plan per structure, and what the modules and the cost model take from it."""

from __future__ import annotations

import pytest

from megatron_sffn.parallel.plan import candidate_strategies, choose_strategy, factor_placements
from megatron_sffn.parallel.plans import PLANS, ROLES, FFNShape
from megatron_sffn.structured import counts

SHAPES = [  # (kind, hidden, ffn_hidden, rank, blocks)
    ("dense", 64, 256, None, None),
    ("lowrank", 64, 256, 16, None),
    ("blockdense", 64, 256, 32, 4),
    ("blockshuffle", 64, 256, None, 4),
    ("blockshuffle", 64, 128, None, 2),
]


def test_every_structure_has_one_plan():
    assert sorted(PLANS) == sorted(counts.STRUCTURES)
    assert all(kind == plan.kind for kind, plan in PLANS.items())


def test_every_plan_with_modes_has_its_tp_linears():
    from megatron_sffn.parallel.mlp_spec import STRUCTURED_LINEARS

    assert sorted(STRUCTURED_LINEARS) == sorted(kind for kind, plan in PLANS.items() if plan.in_modes)
    for kind, linears in STRUCTURED_LINEARS.items():
        assert [(cls.kind, cls.role) for cls in linears] == [(kind, role) for role in ROLES]


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("kind, hidden, ffn_hidden, rank, blocks", SHAPES)
def test_declared_factors_are_the_structures_weights(kind, hidden, ffn_hidden, rank, blocks, gated):
    """Under every strategy, each linear's declared factors hold exactly the paper's weight count."""
    shape = FFNShape(kind, hidden, ffn_hidden, rank, blocks, gated)
    sizes = {"fc1": (hidden, shape.fc1_out), "fc2": (ffn_hidden, hidden)}
    for strategy in candidate_strategies(kind) or [None]:
        placements = factor_placements(shape, strategy)
        for role in ROLES:
            declared = sum(numel for name, numel, _ in placements if name.startswith(f"{role}."))
            assert declared == counts.weight_params(kind, *sizes[role], rank, blocks), (role, strategy)


def test_only_the_moded_factors_change_placement():
    """fc1's out-factor and fc2's in-factor are sharded by hidden unit under every strategy (plan docstring)."""
    for kind, hidden, ffn_hidden, rank, blocks in SHAPES:
        shape = FFNShape(kind, hidden, ffn_hidden, rank, blocks)
        for strategy in candidate_strategies(kind):
            factors = PLANS[kind].factors(shape, strategy)
            fc1_out, fc2_in = list(factors["fc1"].values())[-1], next(iter(factors["fc2"].values()))
            assert fc1_out.placement == fc2_in.placement == "sharded" and fc1_out.strided, (kind, strategy)


def test_dense_layers_take_no_strategy():
    """A model's dense layers share the structured layers' configured ``tp_strategy`` and ignore it."""
    assert choose_strategy(FFNShape("dense", 64, 256), 2, "split/reduce") is None
    with pytest.raises(ValueError, match="unknown structure 'sparse'"):
        choose_strategy(FFNShape("sparse", 64, 256), 2)
