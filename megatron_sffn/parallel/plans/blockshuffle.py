"""BlockShuffle (Monarch) over a tensor-parallel group (the forward and its derivation: :mod:`..blockshuffle`).

A rank owns a contiguous 1/tp range of the paper-ordered hidden units: rows
of every W2 group in fc1 (W2 stored row-major ``(f/B, B, d/B)`` so the rows
are an axis-0 slice), whole W1 blocks and a column slice of every W2 block in
fc2, whose partial outputs are all-reduced (``reduce``, the only out-mode).
fc1's ``W1`` (the in-factor) feeds every rank's W2 rows with the whole
d-long middle vector: ``split`` computes whole W1 blocks on the rank's d/tp
inputs and all-gathers the vector (exact FLOPs, g·d more forward traffic
than the dense FFN); ``replicated`` computes W1 whole on every rank (no
forward traffic, (1 - 1/tp) of W1's FLOPs as overhead).
"""

from __future__ import annotations

from fractions import Fraction

from ..layout import REPLICATED, SHARDED, FactorSpec, require_divisible
from .structure import FFNShape, StructurePlan, TPStrategy, all_reduced, fc1_in_traffic


class BlockShufflePlan(StructurePlan):
    kind = "blockshuffle"
    in_modes = ("split", "replicated")
    out_modes = ("reduce",)

    def factors(self, shape: FFNShape, strategy: TPStrategy) -> dict[str, dict[str, FactorSpec]]:
        b, d = shape.blocks, shape.hidden
        w1_shape = (b, d // b, d // b)
        w1 = FactorSpec(w1_shape, SHARDED, 0) if strategy.fc1_in == "split" else FactorSpec(w1_shape, REPLICATED)
        return {
            "fc1": {"w1": w1, "w2": FactorSpec((shape.fc1_out // b, b, d // b), SHARDED, 0, strided=True)},
            "fc2": {
                "w1": FactorSpec((b, d // b, shape.ffn_hidden // b), SHARDED, 0),
                "w2": FactorSpec((b, d // b, d // b), SHARDED, 2),
            },
        }

    def traffic(self, shape: FFNShape, strategy: TPStrategy, tp: int) -> tuple[Fraction, Fraction]:
        d = shape.hidden
        fwd, bwd = fc1_in_traffic(strategy.fc1_in, d, d, tp)
        return fwd + all_reduced(d, tp), bwd

    def saved_features(self, shape: FFNShape, strategy: TPStrategy, tp: int) -> int:
        """fc1's whole middle vector, fc2's d/tp slice of its own, and split fc1's local slice before the gather."""
        d, f1, f = shape.hidden, shape.fc1_out, shape.ffn_hidden
        inner = min(d, f1) + min(f, d) // tp
        if tp > 1 and strategy.fc1_in == "split":
            inner += d // tp
        return inner

    def require_shardable(self, shape: FFNShape, tp: int) -> None:
        require_divisible("blockshuffle: blocks", shape.blocks, tp)
        # a rank's hidden range is whole fc2 blocks and rows of every fc1 group
        require_divisible("blockshuffle: hidden_size/blocks", shape.hidden // shape.blocks, tp)
        require_divisible("blockshuffle: ffn_hidden_size/blocks", shape.ffn_hidden // shape.blocks, tp)
