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
from ..structured.take import take
from . import comm
from .base import TPStructuredLinear


class BlockDenseFC1(TPStructuredLinear):
    """Up-projection; output: this rank's hidden units."""

    kind, role = "blockdense", "fc1"

    def _full_from_pure(self, pure) -> dict[str, torch.Tensor]:
        return {"k": pure.k, "u": pure.u}

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self._whole_block_diag(x, self.k), self.u)

    def _project_subset(self, x: torch.Tensor, selection) -> torch.Tensor:
        """The selected hidden units are rows of U (both halves when gated); K is shared by all."""
        return linear(self._whole_block_diag(x, self.k), take(self.u, selection.fc1_rows(self.shape.gated)))


class BlockDenseFC2(TPStructuredLinear):
    """Down-projection; input: this rank's hidden units, output: complete on every rank."""

    kind, role = "blockdense", "fc2"

    def _full_from_pure(self, pure) -> dict[str, torch.Tensor]:
        return {"k": pure.k, "u": pure.u}

    def _project(self, a: torch.Tensor) -> torch.Tensor:
        return self._output(block_diag_matmul(a, self.k))  # (tokens, R/tp): this rank's blocks

    def _project_subset(self, a: torch.Tensor, selection) -> torch.Tensor:
        """The selected hidden units are inputs of K's blocks (as many in each), scaled by 1/p; U is shared."""
        within = selection.within_strata  # (local blocks, kept per block): the strata are the blocks
        k = torch.gather(self.k, 2, within.unsqueeze(1).expand(-1, self.k.shape[1], -1))
        return self._output(block_diag_matmul(a, k * selection.scale))

    def _output(self, h_local: torch.Tensor) -> torch.Tensor:
        """``U`` applied to this rank's middle features, complete on every rank."""
        group = self.tp_group
        if self.strategy.fc2_out == "reduce":
            return comm.reduce_from_region(linear(h_local, self.u), group)
        h_slice = comm.features_to_tokens(self._pad_tokens(h_local), group)
        return self._gather_output_tokens(linear(h_slice, self._token_split(self.u)), h_local.shape[0])
