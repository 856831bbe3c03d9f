"""BlockShuffle (Monarch) ``y = P_out · blockdiag(W2) · P_mid · blockdiag(W1) · x`` over a TP group.

The FFN is the paper's at every TP size: fc1's hidden units stay in the
paper's interleaved order (``hidden[t·B + c] = u_c[t]``), which is part of
the function, because fc2's first factor is block-diagonal over them (fc2
block j reads hidden units ``j·f/B .. (j+1)·f/B``, i.e. f/B² units of every
fc1 group c).

A rank owns a contiguous 1/tp range of the hidden units.  Then:

fc2 (f -> d): the range is ``B/tp`` whole blocks of W1, whose outputs are a
contiguous d/tp slice of the middle vector; that slice feeds positions
``a`` of every shuffle group ``c`` in one contiguous range, i.e. a column
slice of every W2 block.  Each rank forms the partial output of its columns
and an all-reduce of d completes it (megatron's row-parallel pattern).  Exact
1/tp of the FLOPs.

fc1 (d -> f): the range is rows ``t`` of every W2 group (hidden unit
``t·B + c``), so W2 splits by rows inside every group, exactly.  Those rows
read the *whole* middle vector ``h = blockdiag(W1) x`` (each group gathers one
of every B consecutive entries of h), so W1 is either
``replicated``: computed whole on every rank, no forward traffic and the
    backward all-reduce of d that the dense fc1 also has; overhead (1 - 1/tp)
    of W1's FLOPs; or
``split``: whole W1 blocks per rank on their d/tp inputs, the middle vector
    all-gathered (g·d forward, reduce-scatter of it and all-gather of the input
    gradient backward); exact FLOPs, but g·d more forward traffic than the
    dense FFN, so the automatic plan (:mod:`.plan`) takes ``replicated``.

W2 is stored row-major, ``w2[t, c] = W2[c, t]`` with shape ``(f/B, B, d/B)``,
so that a rank's rows are an axis-0 slice like every other fc1 output factor
(megatron's gated-FFN checkpoint factory splits axis 0).

Hidden-unit subsets (evolving subnetwork training): the draw keeps the same
number of rows of every fc1 group inside every fc2 block's range
(:class:`~megatron_sffn.est.Subset` cells), given in the compacted
interleaved order ``j'·B + c``.  fc1 keeps those rows of W2 (its stored
``w2`` flattened is indexed by the hidden unit ``t·B + c`` itself), fc2 the
matching columns of its W1 blocks, so both stay Monarch products of width
p·f, computed by the same kernels, and a rank's kept units are still B/tp
whole fc2 blocks of the smaller FFN.

Checkpoints carry :data:`HIDDEN_ORDER` in each module's ``_extra_state``;
one without it was written when fc1's hidden units were block-major, a
different FFN, and is refused on load (:meth:`BlockShuffleFC1.set_extra_state`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..structured.functional import block_diag_matmul, shuffle_blocks_matmul
from ..structured.take import take
from . import comm
from .base import TPStructuredLinear

HIDDEN_ORDER = "blockshuffle-hidden-units/paper-interleaved"


class _BlockShuffleLinear(TPStructuredLinear):
    """What both linears share: the hidden-unit order recorded in and required of checkpoints."""

    kind = "blockshuffle"
    validates_extra_state = True  # checked before tensors load (training.checkpointing.check_module_markers)

    def get_extra_state(self) -> dict[str, str]:
        return {"hidden_order": HIDDEN_ORDER}

    def set_extra_state(self, state: Any) -> None:
        found = state.get("hidden_order") if isinstance(state, dict) else None
        if found != HIDDEN_ORDER:
            raise ValueError(
                f"blockshuffle {self.role}: the checkpoint records hidden-unit order {found!r}, expected "
                f"{HIDDEN_ORDER!r}. A BlockShuffle checkpoint without this marker was written with fc1's hidden "
                f"units block-major, where fc2's block c read only fc1's block c: a different FFN from the "
                f"paper's, whose weights do not compute the paper's BlockShuffle under any relabeling, so it is "
                f"not loaded. Retrain (or fine-tune from a dense or other structured checkpoint) with this version."
            )


class BlockShuffleFC1(_BlockShuffleLinear):
    """Up-projection; output: this rank's contiguous range of the (interleaved) hidden units."""

    role = "fc1"

    def _full_from_pure(self, pure) -> dict[str, torch.Tensor]:
        return {"w1": pure.w1, "w2": pure.w2.transpose(0, 1)}

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        h = self._whole_block_diag(x, self.w1)
        return shuffle_blocks_matmul(h, self.w2.transpose(0, 1))  # rows t of every group, interleaved

    def _project_subset(self, x: torch.Tensor, selection) -> torch.Tensor:
        """The selected units are rows of W2 (both halves when gated), ``B`` per compacted row; W1 is shared."""
        h = self._whole_block_diag(x, self.w1)
        rows = take(self.w2.flatten(0, 1), selection.fc1_rows(self.shape.gated))  # row t·B + c is W2[c, t]
        return shuffle_blocks_matmul(h, rows.view(-1, *self.w2.shape[1:]).transpose(0, 1))


class BlockShuffleFC2(_BlockShuffleLinear):
    """Down-projection; input: this rank's hidden units, output: complete on every rank."""

    role = "fc2"

    def _full_from_pure(self, pure) -> dict[str, torch.Tensor]:
        return {"w1": pure.w1, "w2": pure.w2}

    def _project(self, a: torch.Tensor) -> torch.Tensor:
        h_local = block_diag_matmul(a, self.w1)  # this rank's d/tp slice of the middle vector
        # The slice is positions a of every shuffle group c: with the column slice of every W2 block,
        # the same shuffle-and-interleave as fc1's gives this rank's partial output.
        return comm.reduce_from_region(shuffle_blocks_matmul(h_local, self.w2), self.tp_group)

    def _project_subset(self, a: torch.Tensor, selection) -> torch.Tensor:
        """The selected units are inputs of every W1 block (as many in each), scaled by 1/p; W2 is shared."""
        blocks, rows, width = self.w1.shape
        offsets = torch.arange(blocks, device=selection.units.device).unsqueeze(1) * width
        columns = (selection.units.view(blocks, -1) - offsets).unsqueeze(1).expand(-1, rows, -1)
        h_local = block_diag_matmul(a, torch.gather(self.w1, 2, columns) * selection.scale)
        return comm.reduce_from_region(shuffle_blocks_matmul(h_local, self.w2), self.tp_group)
