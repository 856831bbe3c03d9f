"""BlockDense ``y = U · blockdiag(K) · x`` over a tensor-parallel group (the forward: :mod:`..blockdense`).

Whole blocks of K go to ranks.  U of fc1 splits by hidden unit; fc2's hidden
units are exactly the inputs of its K blocks.  fc1's ``K`` (the in-factor):
``split`` gives each rank whole blocks on its d/tp input features, the R
features all-gathered; ``replicated`` keeps every block on every rank.
fc2's ``U`` (the out-factor): ``reduce`` takes the column slice matching the
rank's R/tp middle features and all-reduces the partial outputs; ``token``
all-to-alls the middle features into token slices and runs the whole U on
1/tp of the tokens before an all-gather of d.
"""

from __future__ import annotations

from fractions import Fraction

from ..layout import REPLICATED, SHARDED, TOKEN_SPLIT, FactorSpec, require_divisible
from .structure import FFNShape, StructurePlan, TPStrategy, all_reduced, all_to_all, fc1_in_traffic, gathered


class BlockDensePlan(StructurePlan):
    kind = "blockdense"
    in_modes = ("split", "replicated")
    out_modes = ("token", "reduce")

    def factors(self, shape: FFNShape, strategy: TPStrategy) -> dict[str, dict[str, FactorSpec]]:
        r, b, d = shape.rank, shape.blocks, shape.hidden
        k1_shape = (b, r // b, d // b)
        k1 = FactorSpec(k1_shape, SHARDED, 0) if strategy.fc1_in == "split" else FactorSpec(k1_shape, REPLICATED)
        u2 = FactorSpec((d, r), TOKEN_SPLIT) if strategy.fc2_out == "token" else FactorSpec((d, r), SHARDED, 1)
        return {
            "fc1": {"k": k1, "u": FactorSpec((shape.fc1_out, r), SHARDED, 0, strided=True)},
            "fc2": {"k": FactorSpec((b, r // b, shape.ffn_hidden // b), SHARDED, 0), "u": u2},
        }

    def traffic(self, shape: FFNShape, strategy: TPStrategy, tp: int) -> tuple[Fraction, Fraction]:
        r, d = shape.rank, shape.hidden
        fwd, bwd = fc1_in_traffic(strategy.fc1_in, r, d, tp)
        if strategy.fc2_out == "reduce":
            return fwd + all_reduced(d, tp), bwd
        # token: all-to-all of the R middle features, all-gather d; backward: the all-to-all back
        return fwd + all_to_all(r, tp) + gathered(d, tp), bwd + all_to_all(r, tp)

    def saved_features(self, shape: FFNShape, strategy: TPStrategy, tp: int) -> int:
        """Each linear's R-long inner vector, the input of its U."""
        return 2 * shape.rank

    def require_shardable(self, shape: FFNShape, tp: int) -> None:
        require_divisible("blockdense: blocks", shape.blocks, tp)  # whole blocks per rank
