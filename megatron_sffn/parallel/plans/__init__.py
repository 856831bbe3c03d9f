"""The structure registry: one plan per structure, declaring how its FFN splits over a TP group.

Adding a structure means one module here, registered below, next to its TP
linears (:mod:`..mlp_spec`) and its pure layer (:mod:`megatron_sffn.structured`).
"""

from __future__ import annotations

from .blockdense import BlockDensePlan
from .blockshuffle import BlockShufflePlan
from .dense import DensePlan
from .lowrank import LowRankPlan
from .structure import ROLES, FFNShape, StructurePlan, TPStrategy

PLANS: dict[str, StructurePlan] = {
    plan.kind: plan for plan in (DensePlan(), LowRankPlan(), BlockDensePlan(), BlockShufflePlan())
}

__all__ = ["PLANS", "ROLES", "FFNShape", "StructurePlan", "TPStrategy"]
