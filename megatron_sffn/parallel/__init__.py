"""Tensor-parallel structured FFN linears for megatron-core (see docs/tensor-parallel.md)."""

from .blockdense import BlockDenseFC1, BlockDenseFC2
from .blockshuffle import BlockShuffleFC1, BlockShuffleFC2
from .comm import ShapeOnlyGroup, record_traffic
from .grads import average_token_split_grads
from .lowrank import LowRankFC1, LowRankFC2
from .mlp_spec import STRUCTURED_LINEARS, mlp_spec
from .plan import FFNShape, RankCost, TPStrategy, choose_strategy, rank_cost

__all__ = [
    "BlockDenseFC1",
    "BlockDenseFC2",
    "BlockShuffleFC1",
    "BlockShuffleFC2",
    "FFNShape",
    "LowRankFC1",
    "LowRankFC2",
    "RankCost",
    "STRUCTURED_LINEARS",
    "ShapeOnlyGroup",
    "TPStrategy",
    "average_token_split_grads",
    "choose_strategy",
    "mlp_spec",
    "rank_cost",
    "record_traffic",
]
