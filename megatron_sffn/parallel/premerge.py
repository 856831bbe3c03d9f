"""Pre-merge: a structured linear that also holds the dense matrix of its own TP shard.

The structured factors are linear, so their product can be formed once after
training ("Building on Efficient Foundations", pre-merge for online
decoding).  Few tokens in flight make a linear memory-bound, and a dense
matrix-vector product then beats the chain of smaller structured products;
many tokens make it compute-bound, and the factors' fewer FLOPs win.  So the
layer keeps both and picks per call by the call's token count.

The merged matrix is :meth:`~.guide.GuideMixin.dense_shard`: identity inputs
pushed through the layer's own structured product, so it is by construction
the local map the layer computes, whatever the TP layout of the factors
(fc2's probe gives this rank's local columns, not the reduced sum).  It is
applied the way megatron's column/row parallel pair applies a dense shard
(:meth:`~.guide.GuideMixin._dense_apply`), with the same communication as the
dense FFN.  It lives in a non-persistent buffer: it never enters
``state_dict`` or ``sharded_state_dict``, so checkpoints stay factor-only.
"""

from __future__ import annotations

import sys

import torch

ALWAYS = sys.maxsize  # a threshold that every call is at or below
NEVER = 0  # no call has zero tokens


class PreMergeMixin:
    """Merged-matrix state and dispatch of :class:`~.base.TPStructuredLinear` (``self`` is the layer).

    ``merge_threshold``: calls of at most this many tokens use the merged
    matrix (when one is attached), larger calls the factors.  Every TP rank of
    a layer sees the same token count and holds the same threshold, so all
    ranks take the same branch and run the same collectives.
    """

    merged: torch.Tensor | None
    merge_threshold: int

    def _init_merged(self) -> None:
        self.register_buffer("merged", None, persistent=False)
        self.merge_threshold = NEVER

    @torch.no_grad()
    def attach_merged(self, threshold: int = ALWAYS) -> int:
        """Build the merged shard (collective over the TP group); returns its size in bytes."""
        if self.guide is not None:
            raise ValueError(f"{self.kind} {self.role}: pre-merge applies to a trained layer, not one with a guide")
        self.merged = self.dense_shard()
        self.merge_threshold = threshold
        return self.merged.numel() * self.merged.element_size()

    def drop_merged(self) -> None:
        self.merged = None
        self.merge_threshold = NEVER

    def uses_merged(self, tokens: int) -> bool:
        """Whether a call with ``tokens`` tokens runs on the merged matrix."""
        return self.merged is not None and tokens <= self.merge_threshold

    def _structured_or_merged(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's map on ``(tokens, features)``, bias excluded, by whichever form is faster here."""
        if self.uses_merged(x.shape[0]):
            return self._dense_apply(x, self.merged)
        return self._project(x)
