"""The dense guide of a tensor-parallel structured linear (self-guided training).

The guide is sharded exactly like the dense layer of the same shape would be
in megatron: fc1's guide is column-parallel over the hidden units, its rows in
the structured fc1's own hidden-unit order (a contiguous range of
BlockShuffle's interleaved paper order, ``[gate_r, value_r]`` for a gated FFN); fc2's guide is row-parallel over the
same hidden units, its partial outputs all-reduced.  The FFN's hidden units
therefore mean the same thing to both branches of the mixture on every rank.

The guide starts as the layer's exact dense equivalent.  Rather than one
``to_dense`` formula per structure and strategy, :meth:`GuideMixin.dense_shard`
pushes identity matrices through the layer's own structured product (the code
that trains), so the initial guide is, by construction, the map the layer
computes; for fc2, whose output is reduced over ranks, one rank at a time feeds
the identity while the others feed zeros.  The cost is one forward of d (fc1)
or f (fc2) tokens, once per run.

Guides are attached *after* the model is wrapped for data parallelism, so that
megatron's DDP grad buffers and the model's optimizer never contain them; the
trainer gives them their own (see :mod:`megatron_sffn.training.self_guided`).
"""

from __future__ import annotations

import torch
from torch.nn.functional import linear

from ..structured.guided import mix_guided
from . import comm
from .layout import set_tp_attributes


class GuideMixin:
    """Guide state and compute of :class:`~.base.TPStructuredLinear` (``self`` is the layer).

    ``guide_alpha`` is the dense branch's weight in the next forward; 0 skips
    the branch (no FLOPs, no communication).
    """

    guide: torch.nn.Parameter | None
    guide_alpha: float

    def _init_guide(self) -> None:
        self.register_parameter("guide", None)
        self.guide_alpha = 0.0

    def guide_split(self) -> tuple[int, int]:
        """(axis, stride) of the guide's shard: fc1 like ColumnParallelLinear, fc2 like RowParallelLinear."""
        return (0, self.shape.stride) if self.role == "fc1" else (1, 1)

    @torch.no_grad()
    def dense_shard(self) -> torch.Tensor:
        """This rank's shard of the layer's dense ``(out, in)`` matrix; collective over the TP group."""
        factor = getattr(self, next(iter(self._factors)))
        options = {"dtype": factor.dtype, "device": factor.device}
        if self.role == "fc1":
            return self._project(torch.eye(self.input_size, **options)).t().contiguous()
        local = self.input_size // self.layout.size  # this rank's hidden units
        eye, zeros = torch.eye(local, **options), torch.zeros(local, local, **options)
        mine = None
        for source in range(self.layout.size):
            columns = self._project(eye if source == self.layout.rank else zeros)  # W[:, hidden of source]^T
            if source == self.layout.rank:
                mine = columns.t().contiguous()
        return mine

    def attach_guide(self) -> torch.nn.Parameter:
        """Add the guide, initialised to :meth:`dense_shard`, with megatron's TP marks; returns it."""
        guide = torch.nn.Parameter(self.dense_shard())
        axis, stride = self.guide_split()
        set_tp_attributes(guide, axis, stride)
        self.guide = guide
        self.guide_alpha = 0.0
        return guide

    def drop_guide(self) -> None:
        """Remove the guide for good: no parameter, no state-dict entry, no compute."""
        self.guide = None
        self.guide_alpha = 0.0

    def _guided(self, x: torch.Tensor, structured_out: torch.Tensor) -> torch.Tensor:
        """The layer's output on ``(tokens, features)`` input: mixed with the guide when it runs."""
        if self.guide is None or self.guide_alpha <= 0.0:
            return structured_out
        return mix_guided(self.guide_alpha, self._dense_apply(x, self.guide), structured_out)

    def _dense_apply(self, x: torch.Tensor, shard: torch.Tensor) -> torch.Tensor:
        """A dense shard of this layer applied as megatron's column (fc1) / row (fc2) parallel linear would."""
        if self.role == "fc1":
            return linear(comm.copy_to_region(x, self.tp_group), shard)
        return comm.reduce_from_region(linear(x, shard), self.tp_group)
