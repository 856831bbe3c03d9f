"""How a structured FFN is split over a tensor-parallel group, and what each choice costs.

Each structured FFN is ``fc2(act(fc1(x)))`` with two factors per linear.  The
factor nearest the FFN's hidden units always splits cleanly (fc1's output
factor by hidden units, fc2's input factor by hidden units, exactly like
megatron's column/row parallel pair).  The other two factors, fc1's
*in-factor* (d -> m) and fc2's *out-factor* (m -> d), touch every hidden unit
and have modes, which each structure's plan declares (:mod:`.plans`):

fc1 in-factor
  ``split``       exact 1/tp of its FLOPs; its output all-gathered.
  ``replicated``  full factor on every rank, no forward communication,
                  (1 - 1/tp) of its FLOPs as overhead.
fc2 out-factor
  ``token``       exact; the middle features re-cut along tokens, the factor
                  applied to 1/tp of the tokens, d all-gathered.
  ``reduce``      exact; partial outputs from the rank's share of the middle
                  features, all-reduced (megatron's row-parallel pattern).
  ``replicated``  the middle features all-reduced, then the full factor on
                  every rank (overhead (1 - 1/tp) of its FLOPs).

Everything here loops over the plans' declarations: a factor's FLOPs and
parameters follow from its placement, the traffic and the saved features are
the plan's.  The automatic choice takes, among the combinations whose
forward *and* backward traffic are each at most the dense FFN's, the one with
the fewest FLOPs per rank, then the least traffic, then the fewest parameters
per rank.  All figures are exact fractions per rank and per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from itertools import product

from .layout import REPLICATED, SHARDED, require_divisible
from .plans import PLANS, ROLES, FFNShape, StructurePlan, TPStrategy

__all__ = [
    "FFNShape",
    "RankCost",
    "TPStrategy",
    "candidate_strategies",
    "choose_strategy",
    "dense_equivalent",
    "factor_placements",
    "parse_strategy",
    "plan_of",
    "rank_cost",
    "require_shardable",
    "saved_features_per_token",
]


@dataclass(frozen=True)
class RankCost:
    """What one rank holds, computes and sends for one FFN, per token (parameters: in total)."""

    forward_flops: Fraction
    backward_flops: Fraction
    forward_comm: Fraction
    backward_comm: Fraction
    params: int


def plan_of(kind: str) -> StructurePlan:
    """The registered plan of structure ``kind``; a ValueError naming the known ones otherwise."""
    if kind not in PLANS:
        raise ValueError(f"unknown structure {kind!r}; expected one of {', '.join(PLANS)}")
    return PLANS[kind]


def candidate_strategies(kind: str) -> list[TPStrategy]:
    """Every mode combination of ``kind``, in the order the automatic choice breaks ties by (none for dense)."""
    plan = plan_of(kind)
    return [TPStrategy(i, o) for i, o in product(plan.in_modes, plan.out_modes)]


def parse_strategy(kind: str, text: str) -> TPStrategy:
    """``"<fc1_in>/<fc2_out>"`` as a strategy of ``kind``; a ValueError listing the allowed ones otherwise."""
    allowed = [str(s) for s in candidate_strategies(kind)]
    if not allowed:
        raise ValueError(f"no tensor-parallel strategies for structure {kind!r}")
    if text not in allowed:
        raise ValueError(f"{kind}: tp_strategy={text!r}; expected 'auto' or one of {allowed}")
    fc1_in, fc2_out = text.split("/")
    return TPStrategy(fc1_in, fc2_out)


def require_shardable(shape: FFNShape, tp: int) -> None:
    """Raise a ValueError naming the numbers if ``shape`` cannot be split over ``tp`` ranks."""
    shape.validate()
    require_divisible("ffn_hidden_size", shape.ffn_hidden, tp)
    PLANS[shape.kind].require_shardable(shape, tp)


def factor_placements(shape: FFNShape, strategy: TPStrategy | None) -> list[tuple[str, int, str]]:
    """``(name, full elements, placement)`` of every weight factor of the FFN under ``strategy``."""
    factors = plan_of(shape.kind).factors(shape, strategy)
    return [(f"{role}.{name}", spec.numel, spec.placement) for role in ROLES for name, spec in factors[role].items()]


def rank_cost(shape: FFNShape, strategy: TPStrategy | None, tp: int) -> RankCost:
    """Closed-form per-rank cost of ``shape`` under ``strategy`` (None for dense)."""
    flops = Fraction(0)
    params = 0
    for _, numel, placement in factor_placements(shape, strategy):
        flops += Fraction(2 * numel, 1 if placement == REPLICATED else tp)
        params += numel if placement != SHARDED else numel // tp
    params += shape.fc1_out // tp + shape.hidden  # fc1 bias sharded, fc2 bias replicated
    fwd_comm, bwd_comm = PLANS[shape.kind].traffic(shape, strategy, tp)
    return RankCost(flops, 2 * flops, fwd_comm, bwd_comm, params)


def dense_equivalent(shape: FFNShape) -> FFNShape:
    return FFNShape("dense", shape.hidden, shape.ffn_hidden, gated=shape.gated)


def choose_strategy(shape: FFNShape, tp: int, override: str | None = None) -> TPStrategy | None:
    """The strategy the modules use: ``override`` if given (not "auto"), else the automatic choice.

    None for a structure without modes (dense: megatron's own split), whatever
    ``override`` says: the configured strategy is the structured layers', and
    a model's dense layers share its configuration.
    """
    if not plan_of(shape.kind).in_modes:
        return None
    if override not in (None, "auto"):
        return parse_strategy(shape.kind, override)
    dense = rank_cost(dense_equivalent(shape), None, tp)
    best = None
    for order, strategy in enumerate(candidate_strategies(shape.kind)):
        cost = rank_cost(shape, strategy, tp)
        if cost.forward_comm > dense.forward_comm or cost.backward_comm > dense.backward_comm:
            continue
        key = (cost.forward_flops, cost.forward_comm + cost.backward_comm, cost.params, order)
        if best is None or key < best[0]:
            best = (key, strategy)
    if best is None:  # every structure has a strategy within the dense budget; this guards the plans
        raise AssertionError(f"no tensor-parallel strategy of {shape} stays within dense traffic at tp={tp}")
    return best[1]


def saved_features_per_token(shape: FFNShape, tp: int, override: str | None = "auto") -> int:
    """Inner features per token one rank's FFN linears keep for the backward pass, under the modules' strategy.

    Beyond the FFN's input and hidden activations, which every structure
    keeps alike.  ``override`` is the configured ``tp_strategy``; one rank
    holds every factor whole, so at ``tp=1`` no strategy is asked for.
    """
    strategy = choose_strategy(shape, tp, override) if tp > 1 else None
    return plan_of(shape.kind).saved_features(shape, strategy, tp)
