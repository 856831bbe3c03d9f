"""Structured linear maps in pure PyTorch (no megatron, no distribution)."""

from .counts import STRUCTURES, forward_flops_per_token, validate_structure, weight_params
from .functional import block_diag_matmul, monarch_matmul
from .layers import (
    BlockDense,
    BlockShuffle,
    Dense,
    LowRank,
    StructuredLinear,
    build_linear,
    ideal_speedup,
    monarch_permutations,
)

__all__ = [
    "STRUCTURES",
    "BlockDense",
    "BlockShuffle",
    "Dense",
    "LowRank",
    "StructuredLinear",
    "block_diag_matmul",
    "build_linear",
    "forward_flops_per_token",
    "ideal_speedup",
    "monarch_matmul",
    "monarch_permutations",
    "validate_structure",
    "weight_params",
]
