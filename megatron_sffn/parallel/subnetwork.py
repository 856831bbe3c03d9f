"""megatron's attention and MLP computing only a subnetwork: sliced weights, smaller matmuls (EST).

Evolving subnetwork training (:mod:`megatron_sffn.est`) draws, per step and
layer, the query heads and FFN hidden units that compute.  These module
swaps (placed by the layer spec) run exactly that subset on this rank's
shard, gathering the kept rows and columns of the weights into smaller
dense operands, so the dropped work is never done (a mask would do it all
and multiply by zero).  Without a selection they are megatron's modules,
bit for bit.

Heads (``SelfAttention``): ``linear_qkv``'s rows of the kept query heads and
of the key/value groups they read (GQA: a group with no kept head is skipped
too), ``linear_proj``'s columns of the kept heads scaled by 1/p_H.  Core
attention then runs on the kept heads with torch's
``scaled_dot_product_attention`` (megatron's and Transformer Engine's core
attention modules are built for a fixed head count).

The kept rows and columns are gathered with
:func:`~megatron_sffn.structured.take.take` (distinct indices, so the
backward copies the gradient into place instead of accumulating it).

Hidden units (``MLP``): dense fc1's rows (both halves of a gated fc1) and
fc2's columns scaled by 1/p_M; a structured fc1/fc2 computes its own subset
(:meth:`~.base.TPStructuredLinear.forward_hidden_subset`): LowRank and
BlockDense keep the rows of fc1's output factor U and the matching input
columns of fc2's V, or within every block of fc2's K; BlockShuffle keeps
rows of every group of fc1's W2 and the matching columns of every block of
fc2's W1, a smaller Monarch FFN (:mod:`.blockshuffle`).

The selections are per tensor-parallel shard: the draws give every rank the
same number of heads and hidden units (:class:`~megatron_sffn.est.Subset`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.mlp import MLP

from ..est.draws import Subset
from ..structured.take import take
from .base import TPStructuredLinear


@dataclass(frozen=True)
class HeadSelection:
    """This rank's kept query heads as rows of ``linear_qkv`` and columns of ``linear_proj``."""

    qkv_rows: torch.Tensor  # kept q rows, then k rows, then v rows of the kept groups
    proj_columns: torch.Tensor
    heads: int
    groups: int
    group_of_head: torch.Tensor | None  # kept head -> kept group (None: one head per group)
    scale: float

    @classmethod
    def build(
        cls, heads: torch.Tensor, heads_per_group: int, head_dim: int, scale: float, device: torch.device
    ) -> HeadSelection:
        """From the sorted local indices of the kept query heads (megatron's per-group qkv layout)."""
        group = heads // heads_per_group
        kept_groups = group.unique()
        block = (heads_per_group + 2) * head_dim  # rows of one group: its q heads, then k, then v
        within = torch.arange(head_dim)
        q = (group * block + (heads % heads_per_group) * head_dim).unsqueeze(1) + within
        k = (kept_groups * block + heads_per_group * head_dim).unsqueeze(1) + within
        rows = torch.cat([q.reshape(-1), k.reshape(-1), (k + head_dim).reshape(-1)])
        columns = (heads.unsqueeze(1) * head_dim + within).reshape(-1)
        mapping = None if heads_per_group == 1 else torch.searchsorted(kept_groups, group).to(device)
        return cls(rows.to(device), columns.to(device), heads.numel(), kept_groups.numel(), mapping, scale)


@dataclass(frozen=True)
class HiddenSelection:
    """This rank's kept FFN hidden units, also as positions inside each local stratum (BlockDense blocks)."""

    units: torch.Tensor  # local hidden-unit indices in the order fc1 emits them (Subset.indices)
    within_strata: torch.Tensor  # (local strata, kept per stratum)
    scale: float
    local_width: int  # this rank's hidden units

    @classmethod
    def build(cls, subset: Subset, rank: int, size: int, scale: float, device: torch.device) -> HiddenSelection:
        return cls(
            subset.indices(rank, size).to(device),
            subset.local_strata(rank, size).to(device),
            scale,
            subset.total // size,
        )

    def fc1_rows(self, gated: bool) -> torch.Tensor:
        """fc1's output rows: the kept units, and for a gated fc1 (``[gate_r, value_r]``) both halves."""
        return torch.cat([self.units, self.units + self.local_width]) if gated else self.units


def _rank_and_size(tp_group) -> tuple[int, int]:
    """This rank's place in its tensor-parallel group (a single rank without one)."""
    return (tp_group.rank(), tp_group.size()) if tp_group is not None else (0, 1)


class SubnetworkSelfAttention(SelfAttention):
    """megatron's ``SelfAttention``; with :attr:`selection` set, only the selected heads compute."""

    selection: HeadSelection | None = None

    def select_heads(self, subset: Subset | None, p_heads: float) -> None:
        """Keep the heads of ``subset`` (global; None: all) on this rank, each scaled by 1/``p_heads``."""
        if subset is None:
            self.selection = None
            return
        rank, size = _rank_and_size(self.pg_collection.tp)
        per_group = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        self.selection = HeadSelection.build(
            subset.indices(rank, size),
            per_group,
            self.hidden_size_per_attention_head,
            1.0 / p_heads,
            self.linear_qkv.weight.device,
        )

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        key_value_states=None,
        inference_context=None,
        rotary_pos_emb=None,
        *args,
        packed_seq_params=None,
        **kwargs,
    ):
        if self.selection is None:
            return super().forward(
                hidden_states,
                attention_mask,
                key_value_states,
                inference_context,
                rotary_pos_emb,
                *args,
                packed_seq_params=packed_seq_params,
                **kwargs,
            )
        unsupported = (inference_context, packed_seq_params, key_value_states, kwargs.get("attention_bias"))
        if any(value is not None for value in unsupported):
            raise ValueError(
                "a head subset is a training-time selection: no inference context, packed "
                "sequences, cross attention or attention bias"
            )
        return self._selected_forward(hidden_states, attention_mask, rotary_pos_emb)

    def _selected_forward(self, hidden_states: torch.Tensor, attention_mask, rotary_pos_emb):
        from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

        sel, head_dim = self.selection, self.hidden_size_per_attention_head
        qkv_linear, proj = self.linear_qkv, self.linear_proj
        x = copy_to_tensor_model_parallel_region(hidden_states, group=self.pg_collection.tp)
        bias = take(qkv_linear.bias, sel.qkv_rows) if qkv_linear.bias is not None else None
        qkv = F.linear(x, take(qkv_linear.weight, sel.qkv_rows), bias)
        seq, batch = qkv.shape[:2]
        query, key, value = qkv.split([sel.heads * head_dim, sel.groups * head_dim, sel.groups * head_dim], dim=-1)
        query = query.reshape(seq, batch, sel.heads, head_dim)
        key, value = (t.reshape(seq, batch, sel.groups, head_dim) for t in (key, value))
        if rotary_pos_emb is not None:
            q_freqs, k_freqs = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
            query = apply_rotary_pos_emb(query, q_freqs, config=self.config, cp_group=self.pg_collection.cp)
            key = apply_rotary_pos_emb(key, k_freqs, config=self.config, cp_group=self.pg_collection.cp)
        if sel.group_of_head is not None:  # every kept head reads its group's key and value
            key, value = key.index_select(2, sel.group_of_head), value.index_select(2, sel.group_of_head)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # SDPA: [b, heads, s, dim]
        causal = attention_mask is None and seq > 1
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=None if attention_mask is None else ~attention_mask,
            is_causal=causal,
            scale=self.config.softmax_scale or 1.0 / math.sqrt(head_dim),
        )
        context = out.permute(2, 0, 1, 3).reshape(seq, batch, sel.heads * head_dim)
        output = F.linear(context, take(proj.weight, sel.proj_columns, 1) * sel.scale)
        return reduce_from_tensor_model_parallel_region(output, group=self.pg_collection.tp), proj.bias


class SubnetworkMLP(MLP):
    """megatron's ``MLP``; with :attr:`selection` set, only the selected hidden units compute."""

    selection: HiddenSelection | None = None

    def select_hidden(self, subset: Subset | None, p_hidden: float) -> None:
        """Keep the hidden units of ``subset`` (global; None: all) on this rank, each scaled by 1/``p_hidden``."""
        if subset is None:
            self.selection = None
            return
        rank, size = _rank_and_size(self.tp_group)
        weight = next(self.linear_fc1.parameters())
        self.selection = HiddenSelection.build(subset, rank, size, 1.0 / p_hidden, weight.device)

    def forward(self, hidden_states, *args, **kwargs):
        if self.selection is None:
            return super().forward(hidden_states, *args, **kwargs)
        fc1, fc2 = self.linear_fc1, self.linear_fc2
        if isinstance(fc1, TPStructuredLinear):
            hidden, bias = fc1.forward_hidden_subset(hidden_states, self.selection)
            return fc2.forward_hidden_subset(self._activate(hidden, bias), self.selection)
        return self._dense_forward(hidden_states)

    def _activate(self, hidden: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """megatron's unfused activation (GLU: ``act(gate) * value``)."""
        if bias is not None:
            hidden = hidden + bias
        if self.config.gated_linear_unit:
            gate, value = torch.chunk(hidden, 2, dim=-1)
            return self.config.activation_func(gate) * value
        return self.activation_func(hidden)

    def _dense_forward(self, hidden_states: torch.Tensor):
        sel, fc1, fc2 = self.selection, self.linear_fc1, self.linear_fc2
        rows = sel.fc1_rows(bool(self.config.gated_linear_unit))
        x = copy_to_tensor_model_parallel_region(hidden_states, group=self.tp_group)
        hidden = F.linear(x, take(fc1.weight, rows))
        hidden = self._activate(hidden, take(fc1.bias, rows) if fc1.bias is not None else None)
        output = F.linear(hidden, take(fc2.weight, sel.units, 1) * sel.scale)
        return reduce_from_tensor_model_parallel_region(output, group=self.tp_group), fc2.bias
