"""LowRank ``y = U (V x)`` split over a tensor-parallel group.

fc1 (d -> f): ``U1`` rows are split by hidden unit; ``V1`` is token-split
(each rank applies it to 1/tp of the tokens, then the R-vectors are
all-gathered) or replicated.  fc2 (f -> d): ``V2`` columns are split by
hidden unit, giving partial R-vectors; ``U2`` is token-split (reduce-scatter
the R-vectors along tokens, apply U2 to the rank's tokens, all-gather d) or
replicated (all-reduce the R-vectors, full U2).  See :mod:`.plan` for the
costs; with R <= d/2 the token-split pair is exact in FLOPs and sends
2R + d elements per token each way, no more than the dense FFN's 2d.
"""

from __future__ import annotations

import torch
from torch.nn.functional import linear

from ..structured.take import take
from . import comm
from .base import TPStructuredLinear


class LowRankFC1(TPStructuredLinear):
    """Up-projection; output: this rank's hidden units."""

    kind, role = "lowrank", "fc1"

    def _full_from_pure(self, pure) -> dict[str, torch.Tensor]:
        return {"v": pure.v, "u": pure.u}

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self._rank_features(x), self.u)

    def _project_subset(self, x: torch.Tensor, selection) -> torch.Tensor:
        """The selected hidden units are rows of U (both halves when gated); V is shared by all."""
        return linear(self._rank_features(x), take(self.u, selection.fc1_rows(self.shape.gated)))

    def _rank_features(self, x: torch.Tensor) -> torch.Tensor:
        """``V x`` (R features), complete on every rank."""
        group = self.tp_group
        if self.strategy.fc1_in == "split":
            x_slice = comm.split_tokens(self._pad_tokens(x), group)
            h = comm.gather_tokens(linear(x_slice, self._token_split(self.v)), group, partial_grad=True)
            return h[: x.shape[0]]
        return comm.copy_to_region(linear(x, self.v), group)


class LowRankFC2(TPStructuredLinear):
    """Down-projection; input: this rank's hidden units, output: complete on every rank."""

    kind, role = "lowrank", "fc2"

    def _full_from_pure(self, pure) -> dict[str, torch.Tensor]:
        return {"v": pure.v, "u": pure.u}

    def _project(self, a: torch.Tensor) -> torch.Tensor:
        return self._output(linear(a, self.v), a.shape[0])

    def _project_subset(self, a: torch.Tensor, selection) -> torch.Tensor:
        """The selected hidden units are columns of V, scaled by 1/p; U is shared by all."""
        return self._output(linear(a, take(self.v, selection.units, 1) * selection.scale), a.shape[0])

    def _output(self, h_partial: torch.Tensor, tokens: int) -> torch.Tensor:
        """``U`` applied to this rank's partial R features, complete on every rank."""
        group = self.tp_group
        if self.strategy.fc2_out == "token":
            h_slice = comm.reduce_scatter_tokens(self._pad_tokens(h_partial), group)
            return self._gather_output_tokens(linear(h_slice, self._token_split(self.u)), tokens)
        return linear(comm.reduce_from_region(h_partial, group), self.u)
