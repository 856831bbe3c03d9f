"""How a structured FFN is split over a tensor-parallel group, and what each choice costs.

Each structured FFN is ``fc2(act(fc1(x)))`` with two factors per linear.  The
factor nearest the FFN's hidden units always splits cleanly (fc1's output
factor by hidden units, fc2's input factor by hidden units, exactly like
megatron's column/row parallel pair).  The other two factors, fc1's
*in-factor* (d -> m) and fc2's *out-factor* (m -> d), touch every hidden unit
and have modes:

fc1 in-factor
  ``split``       exact 1/tp of its FLOPs.  LowRank: token-split (each rank
                  applies V to 1/tp of the tokens, then all-gathers the
                  R-vectors).  BlockDense: block-split (each rank owns whole
                  blocks of K, all-gathers the R features).  BlockShuffle:
                  block-split like BlockDense (whole W1 blocks on their d/tp
                  inputs, the d-long middle vector all-gathered, because the
                  paper's hidden order makes every rank's W2 rows read all
                  of it).
  ``replicated``  full factor on every rank, no forward communication,
                  (1 - 1/tp) of its FLOPs as overhead.  The only choice
                  within dense traffic for BlockShuffle: its fc2 already
                  all-reduces d, the dense FFN's whole forward budget.
fc2 out-factor
  ``token``       exact.  LowRank: reduce-scatter the partial R-vectors along
                  tokens; BlockDense: all-to-all the local R/tp features into
                  token slices; then U on 1/tp of the tokens and an
                  all-gather of d along tokens.
  ``reduce``      exact.  Partial outputs from the rank's share of the middle
                  features, all-reduced (megatron's row-parallel pattern).
                  BlockDense and BlockShuffle.
  ``replicated``  LowRank: all-reduce the partial R-vector, then the full U
                  on every rank (overhead (1 - 1/tp) of U's FLOPs).

The automatic choice takes, among the combinations whose forward *and*
backward traffic are each at most the dense FFN's, the one with the fewest
FLOPs per rank, then the least traffic, then the fewest parameters per rank.
All figures are exact fractions per rank and per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from itertools import product

from ..structured import counts
from .layout import require_divisible

IN_MODES = {
    "lowrank": ("split", "replicated"),
    "blockdense": ("split", "replicated"),
    "blockshuffle": ("split", "replicated"),
}
OUT_MODES = {"lowrank": ("token", "replicated"), "blockdense": ("token", "reduce"), "blockshuffle": ("reduce",)}


@dataclass(frozen=True)
class TPStrategy:
    """The modes of fc1's in-factor and fc2's out-factor, written ``"<fc1_in>/<fc2_out>"``."""

    fc1_in: str
    fc2_out: str

    def __str__(self) -> str:
        return f"{self.fc1_in}/{self.fc2_out}"

    @classmethod
    def parse(cls, kind: str, text: str) -> "TPStrategy":
        if kind not in IN_MODES:
            raise ValueError(f"no tensor-parallel strategies for structure {kind!r}")
        allowed = [f"{i}/{o}" for i, o in product(IN_MODES[kind], OUT_MODES[kind])]
        if text not in allowed:
            raise ValueError(f"{kind}: tp_strategy={text!r}; expected 'auto' or one of {allowed}")
        fc1_in, fc2_out = text.split("/")
        return cls(fc1_in, fc2_out)


@dataclass(frozen=True)
class FFNShape:
    """One FFN: ``hidden -> ffn_hidden (x2 when gated) -> hidden`` with a structure."""

    kind: str
    hidden: int
    ffn_hidden: int
    rank: int | None = None
    blocks: int | None = None
    gated: bool = False

    @property
    def stride(self) -> int:
        """How many equal parts fc1's output has (gate and value for a gated FFN)."""
        return 2 if self.gated else 1

    @property
    def fc1_out(self) -> int:
        return self.stride * self.ffn_hidden

    def validate(self) -> None:
        counts.validate_structure(self.kind, self.hidden, self.fc1_out, self.rank, self.blocks)
        counts.validate_structure(self.kind, self.ffn_hidden, self.hidden, self.rank, self.blocks)


@dataclass(frozen=True)
class RankCost:
    """What one rank holds, computes and sends for one FFN, per token (parameters: in total)."""

    forward_flops: Fraction
    backward_flops: Fraction
    forward_comm: Fraction
    backward_comm: Fraction
    params: int


def require_shardable(shape: FFNShape, tp: int) -> None:
    """Raise a ValueError naming the numbers if ``shape`` cannot be split over ``tp`` ranks."""
    shape.validate()
    require_divisible("ffn_hidden_size", shape.ffn_hidden, tp)
    if shape.kind in ("blockdense", "blockshuffle"):
        require_divisible(f"{shape.kind}: blocks", shape.blocks, tp)
    if shape.kind == "blockshuffle":  # a rank's hidden range is whole fc2 blocks and rows of every fc1 group
        require_divisible("blockshuffle: hidden_size/blocks", shape.hidden // shape.blocks, tp)
        require_divisible("blockshuffle: ffn_hidden_size/blocks", shape.ffn_hidden // shape.blocks, tp)


# Factor placements: how a full factor of n elements is spread over the group.
_SHARDED = "sharded"  # rank holds n/tp, computes n/tp per token
_REPLICATED = "replicated"  # rank holds n, computes n per token
_TOKEN_SPLIT = "token_split"  # rank holds n, computes n/tp per token


def factor_placements(shape: FFNShape, strategy: TPStrategy) -> list[tuple[str, int, str]]:
    """``(name, full elements, placement)`` of every weight factor of the FFN under ``strategy``."""
    d, f, f1, r, b = shape.hidden, shape.ffn_hidden, shape.fc1_out, shape.rank, shape.blocks
    if shape.kind == "dense":
        return [("fc1.weight", f1 * d, _SHARDED), ("fc2.weight", d * f, _SHARDED)]
    if shape.kind == "lowrank":
        return [
            ("fc1.v", r * d, _TOKEN_SPLIT if strategy.fc1_in == "split" else _REPLICATED),
            ("fc1.u", f1 * r, _SHARDED),
            ("fc2.v", r * f, _SHARDED),
            ("fc2.u", d * r, _TOKEN_SPLIT if strategy.fc2_out == "token" else _REPLICATED),
        ]
    if shape.kind == "blockdense":
        return [
            ("fc1.k", r * d // b, _SHARDED if strategy.fc1_in == "split" else _REPLICATED),
            ("fc1.u", f1 * r, _SHARDED),
            ("fc2.k", r * f // b, _SHARDED),
            ("fc2.u", d * r, _TOKEN_SPLIT if strategy.fc2_out == "token" else _SHARDED),
        ]
    return [
        ("fc1.w1", d * d // b, _SHARDED if strategy.fc1_in == "split" else _REPLICATED),
        ("fc1.w2", f1 * d // b, _SHARDED),
        ("fc2.w1", d * f // b, _SHARDED),
        ("fc2.w2", d * d // b, _SHARDED),
    ]


def _traffic(shape: FFNShape, strategy: TPStrategy, tp: int) -> tuple[Fraction, Fraction]:
    """(forward, backward) elements sent per rank per token."""
    d, m = shape.hidden, shape.rank if shape.kind != "blockshuffle" else shape.hidden

    def gather(n: int) -> Fraction:  # all-gather or reduce-scatter of n features per token
        return Fraction(n * (tp - 1), tp)

    def all_reduce(n: int) -> Fraction:
        return 2 * gather(n)

    if shape.kind == "dense":
        return all_reduce(d), all_reduce(d)
    if strategy.fc1_in == "split":
        fwd, bwd = gather(m), gather(m) + gather(d)
    else:
        fwd, bwd = Fraction(0), all_reduce(m)
    if strategy.fc2_out == "reduce":
        fwd += all_reduce(d)
    elif strategy.fc2_out == "replicated":
        fwd += all_reduce(m)
    elif shape.kind == "lowrank":  # token: reduce-scatter R, all-gather d; back: all-gather R
        fwd += gather(m) + gather(d)
        bwd += gather(m)
    else:  # blockdense token: all-to-all of the local R/tp features, all-gather d; back: all-to-all
        fwd += Fraction(m, tp) * Fraction(tp - 1, tp) + gather(d)
        bwd += Fraction(m, tp) * Fraction(tp - 1, tp)
    return fwd, bwd


def rank_cost(shape: FFNShape, strategy: TPStrategy | None, tp: int) -> RankCost:
    """Closed-form per-rank cost of ``shape`` under ``strategy`` (None for dense)."""
    flops = Fraction(0)
    params = 0
    for _, numel, placement in factor_placements(shape, strategy):
        flops += Fraction(2 * numel, 1 if placement == _REPLICATED else tp)
        params += numel if placement != _SHARDED else numel // tp
    params += shape.fc1_out // tp + shape.hidden  # fc1 bias sharded, fc2 bias replicated
    fwd_comm, bwd_comm = _traffic(shape, strategy, tp)
    return RankCost(flops, 2 * flops, fwd_comm, bwd_comm, params)


def dense_equivalent(shape: FFNShape) -> FFNShape:
    return FFNShape("dense", shape.hidden, shape.ffn_hidden, gated=shape.gated)


def candidate_strategies(kind: str) -> list[TPStrategy]:
    return [TPStrategy(i, o) for i, o in product(IN_MODES[kind], OUT_MODES[kind])]


def choose_strategy(shape: FFNShape, tp: int, override: str | None = None) -> TPStrategy:
    """The strategy the modules use: ``override`` if given (not "auto"), else the automatic choice."""
    if override not in (None, "auto"):
        return TPStrategy.parse(shape.kind, override)
    dense = rank_cost(dense_equivalent(shape), None, tp)
    best = None
    for order, strategy in enumerate(candidate_strategies(shape.kind)):
        cost = rank_cost(shape, strategy, tp)
        if cost.forward_comm > dense.forward_comm or cost.backward_comm > dense.backward_comm:
            continue
        key = (cost.forward_flops, cost.forward_comm + cost.backward_comm, cost.params, order)
        if best is None or key < best[0]:
            best = (key, strategy)
    if best is None:  # every structure has a strategy within the dense budget; this guards the table above
        raise AssertionError(f"no tensor-parallel strategy of {shape} stays within dense traffic at tp={tp}")
    return best[1]
