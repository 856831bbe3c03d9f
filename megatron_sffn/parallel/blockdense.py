"""BlockDense ``y = U · blockdiag(K) · x`` split over a tensor-parallel group.

Whole blocks of K go to ranks (so ``blocks`` must be divisible by tp).
fc1 (d -> f): ``U1`` rows are split by hidden unit; ``K1`` is block-split
(a rank's blocks read its contiguous d/tp input features; the R features are
all-gathered, and on the way back reduce-scattered, with the input gradient
all-gathered) or replicated.  fc2 (f -> d): a rank's hidden units are exactly
the inputs of its ``K2`` blocks, giving it R/tp middle features; ``U2`` then
either takes the matching column slice and all-reduces the partial outputs
(``reduce``), or the middle features are all-to-all'ed into token slices and
the full ``U2`` runs on 1/tp of the tokens before an all-gather of d
(``token``).  Costs and the automatic choice: :mod:`.plan`.
"""

from __future__ import annotations

import torch
from torch.nn.functional import linear

from ..structured.functional import block_diag_matmul
from . import comm
from .base import REPLICATED, SHARDED, TOKEN_SPLIT, FactorSpec, TPStructuredLinear


class BlockDenseFC1(TPStructuredLinear):
    """Up-projection; output: this rank's hidden units."""

    kind, role = "blockdense", "fc1"

    def _factor_specs(self) -> dict[str, FactorSpec]:
        r, b, d = self.shape.rank, self.shape.blocks, self.input_size
        k_shape = (b, r // b, d // b)
        k = FactorSpec(k_shape, SHARDED, 0) if self.strategy.fc1_in == "split" else FactorSpec(k_shape, REPLICATED)
        return {"k": k, "u": FactorSpec((self.output_size, r), SHARDED, 0, strided=True)}

    def _full_from_pure(self, pure) -> dict[str, torch.Tensor]:
        return {"k": pure.k, "u": pure.u}

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self._whole_block_diag(x, self.k), self.u)


class BlockDenseFC2(TPStructuredLinear):
    """Down-projection; input: this rank's hidden units, output: complete on every rank."""

    kind, role = "blockdense", "fc2"

    def _factor_specs(self) -> dict[str, FactorSpec]:
        r, b, d = self.shape.rank, self.shape.blocks, self.output_size
        u = FactorSpec((d, r), TOKEN_SPLIT) if self.strategy.fc2_out == "token" else FactorSpec((d, r), SHARDED, 1)
        return {"k": FactorSpec((b, r // b, self.input_size // b), SHARDED, 0), "u": u}

    def _full_from_pure(self, pure) -> dict[str, torch.Tensor]:
        return {"k": pure.k, "u": pure.u}

    def _project(self, a: torch.Tensor) -> torch.Tensor:
        group = self.tp_group
        h_local = block_diag_matmul(a, self.k)  # (tokens, R/tp): this rank's blocks
        if self.strategy.fc2_out == "reduce":
            return comm.reduce_from_region(linear(h_local, self.u), group)
        h_slice = comm.features_to_tokens(self._pad_tokens(h_local), group)
        return self._gather_output_tokens(linear(h_slice, self._token_split(self.u)), a.shape[0])
