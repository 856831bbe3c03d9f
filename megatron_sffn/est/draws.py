"""The subnetwork of one training step, drawn from counters: which layers, heads and hidden units compute.

A draw is a pure function of ``(seed, step, kind, layer)``: the counters are
chained through :func:`~megatron_sffn.structured.guided.guide_draw` (the
counter-based generator of self-guided training) into the seed of a private
``torch.Generator``.  Every tensor-parallel rank and pipeline stage therefore
computes the same subnetwork without communicating, and a resumed run draws
exactly what the uninterrupted run drew, with no generator state to save.

Draws are *stratified*: the units (a layer's query heads, its FFN hidden
units, or the decoder's layers) are cut into equal contiguous strata and the
same number is kept in each, uniformly at random.  With one stratum per
tensor-parallel rank (per pipeline stage) every rank (stage) does the same
work; a BlockDense FFN's hidden units are stratified by block so that every
block of its K factor keeps the same number of inputs.

A BlockShuffle FFN's hidden units are stratified by *cell*: its hidden
vector is interleaved, ``hidden[j·B + c] = u_c[j]`` (fc1 group c, row j of
its second factor, ``j < s = f/B``), and fc2's block k reads rows
``j ∈ [k·s/B, (k+1)·s/B)`` of every group.  Cell ``(k, c)`` is those rows of
group c; keeping the same number in every cell keeps every fc1 group the
same height and every fc2 block the same width, so the subnetwork is again a
BlockShuffle (Monarch) FFN, of width p·f.  The cells are the strata, ordered
``k·B + c``, so a tensor-parallel rank's B/tp whole fc2 blocks are
contiguous strata.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..structured.guided import guide_draw

LAYERS, HEADS, HIDDEN = 0, 1, 2  # the ``kind`` counter of a draw


def kept_count(rate: float, units: int) -> int | None:
    """``rate`` × ``units`` when that is a whole number >= 1, else None."""
    kept = rate * units
    whole = round(kept)
    return whole if whole >= 1 and math.isclose(kept, whole, rel_tol=0.0, abs_tol=1e-9) else None


@dataclass(frozen=True)
class Subset:
    """``kept[s]``: the sorted positions kept inside stratum ``s`` of ``total`` units (``(strata, k)``).

    ``groups`` 1: stratum s is units ``s·width .. (s+1)·width``; ``groups`` B:
    the strata are the ``(k, c)`` cells of a BlockShuffle FFN with B blocks
    (module docstring).
    """

    total: int
    kept: torch.Tensor
    groups: int = 1

    @property
    def strata(self) -> int:
        return self.kept.shape[0]

    @property
    def count(self) -> int:
        return self.kept.numel()

    @property
    def width(self) -> int:
        """Units per stratum."""
        return self.total // self.strata

    def local_strata(self, rank: int = 0, parts: int = 1) -> torch.Tensor:
        """The kept positions of the strata that part ``rank`` of ``parts`` contiguous parts holds."""
        per = self.strata // parts
        return self.kept[rank * per : (rank + 1) * per]

    def indices(self, rank: int = 0, parts: int = 1) -> torch.Tensor:
        """Kept units of part ``rank`` of ``parts``, as indices into that part's own units.

        Sorted, except for BlockShuffle cells: there the order is the
        compacted FFN's interleaved one, position ``j'·B + c`` holding the
        j'-th kept row of group c (its unit ``J_c[j']·B + c``), which is the
        order its fc1 emits and its fc2 reads them.
        """
        local = self.local_strata(rank, parts)
        if self.groups == 1:
            offsets = torch.arange(local.shape[0]).unsqueeze(1) * self.width
            return (local + offsets).reshape(-1)
        b = self.groups
        blocks = local.shape[0] // b
        rows = local.view(blocks, b, -1) + (torch.arange(blocks) * self.width).view(-1, 1, 1)  # [k, c, i]: row j
        return (rows.transpose(1, 2) * b + torch.arange(b)).reshape(-1)


def draw_subset(
    seed: int, step: int, kind: int, layer: int, *, total: int, strata: int, keep: int, groups: int = 1
) -> Subset:
    """``keep`` units of each of ``strata`` equal strata of ``total``, uniformly at random from the counters.

    ``groups``: see :class:`Subset` (BlockShuffle cells: ``strata`` = B²).
    """
    generator = torch.Generator().manual_seed(int(guide_draw(seed, step, kind, layer) * 2**53))
    scores = torch.rand(strata, total // strata, generator=generator)
    kept = scores.topk(keep, dim=1).indices.sort(dim=1).values
    return Subset(total, kept, groups)


@dataclass(frozen=True)
class LayerDraw:
    """One decoder layer in one step: skipped, or the heads and hidden units it computes (None = all)."""

    layer: int  # 0-based, global
    active: bool
    heads: Subset | None = None
    hidden: Subset | None = None
    p_H: float = 1.0
    p_M: float = 1.0

    @property
    def full(self) -> bool:
        return self.active and self.heads is None and self.hidden is None

    def kv_groups(self, heads_per_group: int) -> int | None:
        """Key/value groups that at least one kept query head reads (None = all)."""
        if self.heads is None:
            return None
        return int((self.heads.indices() // heads_per_group).unique().numel())
