"""One table linking each tensor of our single-process (TP=1) GPTModel to transformers' tensors.

Export reads the table one way, import the other, so the two cannot drift.
Two of our tensors fuse several of transformers':

* megatron's ``linear_qkv`` is laid out per query group: for each of the
  ``G`` key/value heads, the ``heads/G`` query heads of the group, then its
  key head, then its value head (rows of ``head_dim`` each); transformers
  keeps ``q_proj``, ``k_proj`` and ``v_proj`` apart, head-major;
* a SwiGLU ``linear_fc1`` is ``[gate; value]`` (megatron applies the
  activation to the first half), transformers' ``gate_proj`` and ``up_proj``.

A structured FFN linear has no weight matrix; export takes its exact dense
matrix (:meth:`~megatron_sffn.parallel.base.TPStructuredLinear.dense_shard`,
the layer's own product applied to the identity, which at TP=1 is the whole
matrix), so whatever layout a structure stores its factors in, the exported
map is the one the layer computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..config.model import ModelConfig
from .architectures import Family

Split = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
Merge = Callable[[tuple[torch.Tensor, ...]], torch.Tensor]


def _whole(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (t,)


def _only(parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return parts[0]


@dataclass(frozen=True)
class Link:
    """Our ``module.attr`` (a path in the TP=1 GPTModel) and the transformers tensors it holds."""

    module: str
    attr: str  # "weight" or "bias"
    theirs: tuple[str, ...]
    split: Split = _whole
    merge: Merge = _only


def _qkv_split_merge(cfg: ModelConfig) -> tuple[Split, Merge]:
    groups, per_group, head = cfg.num_query_groups, cfg.num_attention_heads // cfg.num_query_groups, cfg.kv_channels

    def split(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rest = t.shape[1:]
        grouped = t.reshape(groups, per_group + 2, head, *rest)
        q = grouped[:, :per_group].reshape(groups * per_group * head, *rest)
        return q, grouped[:, per_group].reshape(groups * head, *rest), grouped[:, per_group + 1].reshape(-1, *rest)

    def merge(parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
        q, k, v = parts
        rest = q.shape[1:]
        grouped = torch.cat(
            [
                q.reshape(groups, per_group, head, *rest),
                k.reshape(groups, 1, head, *rest),
                v.reshape(groups, 1, head, *rest),
            ],
            dim=1,
        )
        return grouped.reshape(-1, *rest)

    return split, merge


def _halves(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.chunk(2, dim=0))


def _concat(parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.cat(parts, dim=0)


def links(cfg: ModelConfig, family: Family) -> list[Link]:
    """Every tensor of the model, in transformers' state-dict order."""
    norm_attrs = ("weight", "bias") if cfg.normalization == "LayerNorm" else ("weight",)
    linear_attrs = ("weight", "bias") if cfg.linear_bias else ("weight",)
    qkv_split, qkv_merge = _qkv_split_merge(cfg)
    fc1_split, fc1_merge = (_halves, _concat) if family.gated else (_whole, _only)
    table = [Link("embedding.word_embeddings", "weight", ("model.embed_tokens.weight",))]
    for i in range(cfg.num_layers):
        ours, theirs = f"decoder.layers.{i}", f"model.layers.{i}"
        attn = f"{theirs}.self_attn"
        table += [Link(f"{ours}.input_layernorm", a, (f"{theirs}.input_layernorm.{a}",)) for a in norm_attrs]
        table += [
            Link(
                f"{ours}.self_attention.linear_qkv",
                a,
                tuple(f"{attn}.{p}_proj.{a}" for p in "qkv"),
                qkv_split,
                qkv_merge,
            )
            for a in linear_attrs
        ]
        table += [Link(f"{ours}.self_attention.linear_proj", a, (f"{attn}.o_proj.{a}",)) for a in linear_attrs]
        table += [Link(f"{ours}.pre_mlp_layernorm", a, (f"{theirs}.post_attention_layernorm.{a}",)) for a in norm_attrs]
        fc1_names = [tuple(f"{theirs}.mlp.{p}.{a}" for p in family.ffn_in) for a in linear_attrs]
        table += [
            Link(f"{ours}.mlp.linear_fc1", a, names, fc1_split, fc1_merge) for a, names in zip(linear_attrs, fc1_names)
        ]
        table += [Link(f"{ours}.mlp.linear_fc2", a, (f"{theirs}.mlp.{family.ffn_out}.{a}",)) for a in linear_attrs]
    table += [Link("decoder.final_layernorm", a, (f"model.norm.{a}",)) for a in norm_attrs]
    if not cfg.tie_embeddings:
        table.append(Link("output_layer", "weight", ("lm_head.weight",)))
    return table


def our_tensor(model: torch.nn.Module, link: Link) -> torch.Tensor:
    """The full tensor ``link`` names in our TP=1 model (a structured linear's exact dense matrix)."""
    from ..parallel.base import TPStructuredLinear

    module = model.get_submodule(link.module)
    if link.attr == "weight" and isinstance(module, TPStructuredLinear):
        return module.dense_shard()
    return getattr(module, link.attr)


def export_tensors(model: torch.nn.Module, cfg: ModelConfig, family: Family) -> Iterator[tuple[str, torch.Tensor]]:
    """transformers' ``(name, tensor)`` pairs of our TP=1 ``model``, produced one link at a time."""
    with torch.no_grad():
        for link in links(cfg, family):
            for name, part in zip(link.theirs, link.split(our_tensor(model, link).detach())):
                yield name, part


def expected_shapes(model: torch.nn.Module, cfg: ModelConfig, family: Family) -> dict[str, tuple[int, ...]]:
    """Shape of every transformers tensor that ``model`` (TP=1, dense FFNs) takes on import."""
    shapes = {}
    for link in links(cfg, family):
        ours = getattr(model.get_submodule(link.module), link.attr)
        for name, part in zip(link.theirs, link.split(torch.empty(ours.shape, device="meta"))):
            shapes[name] = tuple(part.shape)
    return shapes


def import_tensors(
    model: torch.nn.Module, cfg: ModelConfig, family: Family, read: Callable[[str], torch.Tensor]
) -> None:
    """Fill our TP=1 ``model`` (dense FFNs) in place from ``read(name)`` of each transformers tensor."""
    with torch.no_grad():
        for link in links(cfg, family):
            target = getattr(model.get_submodule(link.module), link.attr)
            value = link.merge(tuple(read(name) for name in link.theirs))
            target.copy_(value.to(target.dtype))
