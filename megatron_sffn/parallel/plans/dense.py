"""The dense FFN as megatron splits it: the baseline every structured plan is held to.

fc1 is column-parallel (rows split by hidden unit), fc2 row-parallel
(columns split by hidden unit, partial outputs all-reduced).  The modules
are megatron's own; this plan only costs them, and has no modes.
"""

from __future__ import annotations

from fractions import Fraction

from ..layout import SHARDED, FactorSpec
from .structure import FFNShape, StructurePlan, TPStrategy, all_reduced


class DensePlan(StructurePlan):
    kind = "dense"

    def factors(self, shape: FFNShape, strategy: TPStrategy | None) -> dict[str, dict[str, FactorSpec]]:
        d = shape.hidden
        return {
            "fc1": {"weight": FactorSpec((shape.fc1_out, d), SHARDED, 0, strided=True)},
            "fc2": {"weight": FactorSpec((d, shape.ffn_hidden), SHARDED, 1)},
        }

    def traffic(self, shape: FFNShape, strategy: TPStrategy | None, tp: int) -> tuple[Fraction, Fraction]:
        """fc2's output all-reduced forward, fc1's input gradient all-reduced backward."""
        return all_reduced(shape.hidden, tp), all_reduced(shape.hidden, tp)

    def saved_features(self, shape: FFNShape, strategy: TPStrategy | None, tp: int) -> int:
        return 0
