"""BlockShuffle (Monarch) ``y = P_out · blockdiag(W2) · P_mid · blockdiag(W1) · x`` over a TP group.

Both linears split exactly (1/tp of the FLOPs on every rank) with the dense
FFN's traffic: no communication forward in fc1, one all-reduce of d forward
in fc2, one all-reduce of the input gradient backward in fc1.

fc1 (d -> f) keeps its output block-major (``interleave_output=False``, a
fixed permutation of the hidden units, which changes nothing about the FFN),
so a rank's hidden units are whole output blocks c in C_r of W2.  Group c of
the shuffle reads ``z_c[a] = h[a*B + c]``: the rank needs only the rows of
every W1 block whose index is c mod B for its c -- exactly 1/tp of W1, stored
"group-major" (:func:`..layout.w1_to_group_major`) so that its shard is a
contiguous axis-0 slice.  Requires blocks**2 to divide d.

fc2 (f -> d): a rank's hidden units are the inputs of its W1 blocks, giving
it a contiguous d/tp slice of h, which feeds positions a of every group c in
one contiguous range: a column slice of every W2 block.  Each rank forms the
partial output of its columns; an all-reduce completes it.
"""

from __future__ import annotations

import torch

from ..structured.functional import block_diag_matmul
from . import comm
from .base import SHARDED, FactorSpec, TPStructuredLinear
from .layout import w1_to_group_major


class BlockShuffleFC1(TPStructuredLinear):
    """Up-projection; output: this rank's hidden units (whole block-major output blocks)."""

    kind, role = "blockshuffle", "fc1"

    def _pure_options(self) -> dict:
        return {"interleave_output": False}

    def _factor_specs(self) -> dict[str, FactorSpec]:
        b, d = self.shape.blocks, self.input_size
        return {
            "w1": FactorSpec((b, b, d // b // b, d // b), SHARDED, 0, strided=True),
            "w2": FactorSpec((b, self.output_size // b, d // b), SHARDED, 0, strided=True),
        }

    def _full_from_pure(self, pure) -> dict[str, torch.Tensor]:
        return {"w1": w1_to_group_major(pure.w1), "w2": pure.w2}

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        groups, blocks, per, width = self.w1.shape  # (local groups, B, q/B, d/B)
        tokens = x.shape[0]
        x = comm.copy_to_region(x, self.tp_group)
        x_blocks = x.reshape(tokens, blocks, width).transpose(0, 1)  # (B, T, d/B)
        rows = self.w1.transpose(0, 1).reshape(blocks, groups * per, width)  # block j: rows (c, a') of my groups
        h = torch.bmm(x_blocks, rows.transpose(1, 2)).reshape(blocks, tokens, groups, per)
        z = h.permute(2, 1, 0, 3).reshape(groups, tokens, blocks * per)  # z_c[a], a = j*q/B + a'
        u = torch.bmm(z, self.w2.transpose(1, 2))  # (local groups, T, f/B)
        return u.transpose(0, 1).reshape(tokens, -1)


class BlockShuffleFC2(TPStructuredLinear):
    """Down-projection; input: this rank's hidden units, output: complete on every rank."""

    kind, role = "blockshuffle", "fc2"

    def _factor_specs(self) -> dict[str, FactorSpec]:
        b, d = self.shape.blocks, self.output_size
        return {
            "w1": FactorSpec((b, d // b, self.input_size // b), SHARDED, 0),
            "w2": FactorSpec((b, d // b, d // b), SHARDED, 2),
        }

    def _full_from_pure(self, pure) -> dict[str, torch.Tensor]:
        return {"w1": pure.w1, "w2": pure.w2}

    def _project(self, a: torch.Tensor) -> torch.Tensor:
        blocks = self.w2.shape[0]
        tokens = a.shape[0]
        local_blocks, q, _ = self.w1.shape
        h = block_diag_matmul(a, self.w1)  # (T, local blocks j * q), row rho = a'*B + c of block j
        z = h.reshape(tokens, local_blocks, q // blocks, blocks).permute(3, 0, 1, 2)  # (B_c, T, j, a')
        u = torch.bmm(z.reshape(blocks, tokens, -1), self.w2.transpose(1, 2))  # partial (B, T, d/B)
        y = u.permute(1, 2, 0).reshape(tokens, -1)  # paper's output order: y[t*B + c] = u_c[t]
        return comm.reduce_from_region(y, self.tp_group)
