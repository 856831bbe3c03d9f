"""The model's BlockShuffle MLP computes the paper's FFN (structured-ffn spec, section 1), at TP=1.

megatron's ``MLP`` with the spec factory's fc1/fc2 against the FFN written
from explicit permutation and block-diagonal matrices
(:mod:`tests.workers.blockshuffle_ffn`): output, input gradient and every
weight gradient, fp32.  The same comparison at TP=2, for both fc1
strategies, runs in the torchrun launch of ``test_tp_structured_mp.py``.
"""

from __future__ import annotations

import pytest

from megatron_sffn.parallel.comm import ShapeOnlyGroup
from tests.workers.blockshuffle_ffn import (
    TOLERANCE,
    build_spec_mlp,
    compare_with_spec,
    spec_cases,
)


@pytest.mark.parametrize("case", spec_cases(), ids=lambda c: c.name)
def test_tp1_mlp_is_the_papers_ffn(case):
    errors = compare_with_spec(build_spec_mlp(case, ShapeOnlyGroup(0, 1)), case)
    assert len([k for k in errors if k.startswith("grad:")]) == 6
    bad = {k: v for k, v in errors.items() if not v <= TOLERANCE}
    assert not bad, f"relative errors above {TOLERANCE}: {bad}"


# -- checkpoints of the block-major layout --------------------------------------------------------


def test_state_without_the_hidden_order_marker_is_refused_saying_why():
    from megatron_sffn.parallel.blockshuffle import HIDDEN_ORDER

    case = spec_cases()[0]
    source, target = build_spec_mlp(case, ShapeOnlyGroup(0, 1)), build_spec_mlp(case, ShapeOnlyGroup(0, 1))
    state = source.state_dict()
    assert state["linear_fc1._extra_state"] == {"hidden_order": HIDDEN_ORDER}
    target.load_state_dict(state)  # the current layout loads
    for role in ("linear_fc1", "linear_fc2"):
        for legacy in (
            {**state, f"{role}._extra_state": None},
            {k: v for k, v in state.items() if k != f"{role}._extra_state"},
        ):
            with pytest.raises(ValueError, match="block-major.*different FFN"):
                target.load_state_dict(legacy)
