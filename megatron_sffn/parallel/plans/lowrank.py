"""LowRank ``y = U (V x)`` over a tensor-parallel group (the forward: :mod:`..lowrank`).

Both U of fc1 and V of fc2 split by hidden unit.  fc1's ``V`` (the in-factor):
``split`` is token-split (each rank applies it to 1/tp of the tokens, then
the R-vectors are all-gathered), ``replicated`` is whole on every rank.
fc2's ``U`` (the out-factor): ``token`` reduce-scatters the partial
R-vectors along tokens, applies U to the rank's tokens and all-gathers d;
``replicated`` all-reduces the R-vector and applies the whole U on every
rank.  With R <= d/2 the token-split pair is exact in FLOPs and sends
2R + d elements per token each way, no more than the dense FFN's 2d.
"""

from __future__ import annotations

from fractions import Fraction

from ..layout import REPLICATED, SHARDED, TOKEN_SPLIT, FactorSpec
from .structure import FFNShape, StructurePlan, TPStrategy, all_reduced, fc1_in_traffic, gathered


class LowRankPlan(StructurePlan):
    kind = "lowrank"
    in_modes = ("split", "replicated")
    out_modes = ("token", "replicated")

    def factors(self, shape: FFNShape, strategy: TPStrategy) -> dict[str, dict[str, FactorSpec]]:
        r, d = shape.rank, shape.hidden
        v1 = TOKEN_SPLIT if strategy.fc1_in == "split" else REPLICATED
        u2 = TOKEN_SPLIT if strategy.fc2_out == "token" else REPLICATED
        return {
            "fc1": {"v": FactorSpec((r, d), v1), "u": FactorSpec((shape.fc1_out, r), SHARDED, 0, strided=True)},
            "fc2": {"v": FactorSpec((r, shape.ffn_hidden), SHARDED, 1), "u": FactorSpec((d, r), u2)},
        }

    def traffic(self, shape: FFNShape, strategy: TPStrategy, tp: int) -> tuple[Fraction, Fraction]:
        r, d = shape.rank, shape.hidden
        fwd, bwd = fc1_in_traffic(strategy.fc1_in, r, d, tp)
        if strategy.fc2_out == "token":  # reduce-scatter R, all-gather d; backward: all-gather R
            return fwd + gathered(r, tp) + gathered(d, tp), bwd + gathered(r, tp)
        return fwd + all_reduced(r, tp), bwd

    def saved_features(self, shape: FFNShape, strategy: TPStrategy, tp: int) -> int:
        """Each linear's R-long inner vector, the input of its U."""
        return 2 * shape.rank
