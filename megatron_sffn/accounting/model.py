"""Parameters and FLOPs of a :class:`ModelConfig`.

Parameters are counted the way megatron-core's ``GPTModel`` builds the model
(pre-LN LayerNorm with bias or RMSNorm, qkv/proj/fc linears with or without
biases, RoPE with no position table, a final norm, tied or untied output
layer), so the count
can be checked against ``sum(p.numel())`` of a built model.  FLOPs follow the
formula of "Building on Efficient Foundations" (Wei et al., 2024)::

    forward per token = 2·L·(2·d_attn·d + 2·d_kv·d + 2·seq·d_attn) + 2·(FFN weight params) + 2·V·d

with training = 3 × forward.  MFU must come from these numbers, never from a
dense formula, or a structured model would be credited with FLOPs it skips.

SUPRA layers ("Linearizing Large Language Models", Mercat et al., 2024) replace
the ``2·seq·d_attn`` score term by what their chunked training form computes,
counted the same way (no causal halving): per token, the chunk's scores and
weighted values ``2·C·d_attn`` plus the inter-chunk state read and update
``2·d_head·d_attn``, with ``C = min(chunk_size, seq)``; their feature maps add
``2·d_attn² + 2·d_kv²`` (a query-width map on q, and the shared map again on k
or, with GQA, a kv-width map) to the projections, and ``d_attn² + d_attn``
(+ ``d_kv² + d_kv`` with GQA) parameters.

Extra compute that is not part of the model itself (the dense guides of
self-guided training, which run for a fraction of the steps) enters as
``extra_forward_flops``: forward FLOPs, trained at the same 3× rate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config.model import FFNConfig, ModelConfig
from ..structured import counts

TRAINING_FLOPS_PER_FORWARD = 3  # backward costs two forwards (input and weight gradients)


@dataclass(frozen=True)
class ParameterCount:
    """Parameters by component; ``ffn_weights`` is what the paper reports as "FFN params"."""

    embedding: int
    attention: int
    layernorm: int
    ffn_weights: int
    ffn_biases: int
    output_layer: int

    @property
    def total(self) -> int:
        return sum(dataclasses.astuple(self))


@dataclass(frozen=True)
class ForwardFlops:
    """Forward FLOPs per token by the paper's formula, split by where they are spent."""

    attention_projections: int  # q, k, v and output projections
    attention_scores: int  # QKᵀ and the weighted sum of V over the full context
    ffn: int
    logits: int

    @property
    def total(self) -> int:
        return sum(dataclasses.astuple(self))


@dataclass(frozen=True)
class RunFlops:
    """Training FLOPs of a whole run: the model's own plus any extra compute, both at 3× forward."""

    tokens: int
    model: int
    extra: float

    @property
    def total(self) -> float:
        return self.model + self.extra


def ffn_layer_kinds(cfg: ModelConfig) -> list[str]:
    """The structure of each layer's FFN (the dense layers, layer 0 in the paper, say ``dense``)."""
    return [cfg.ffn.structure if cfg.ffn.is_structured(layer) else "dense" for layer in range(cfg.num_layers)]


def _ffn_weights(cfg: ModelConfig, kind: str, hidden: int | None = None) -> int:
    """One FFN's weight parameters; ``hidden`` replaces ``ffn_hidden_size`` (a subset of the hidden units).

    A subset keeps each linear's BlockShuffle middle width (that of the full FFN's shape).
    """
    if hidden == 0:
        return 0
    return sum(
        counts.weight_params(kind, n, m, cfg.ffn.rank, cfg.ffn.blocks, middle=min(full))
        for (n, m), full in zip(cfg.ffn_shapes(hidden), cfg.ffn_shapes())
    )


def ffn_weight_params(cfg: ModelConfig) -> int:
    """FFN weight parameters of all layers (structured factors, dense layers dense), biases excluded."""
    return sum(_ffn_weights(cfg, kind) for kind in ffn_layer_kinds(cfg))


def supra_feature_map_widths(cfg: ModelConfig) -> list[int]:
    """Widths of a SUPRA layer's square feature maps: one shared by q and k, or with GQA one each."""
    grouped = cfg.num_query_groups < cfg.num_attention_heads
    return [cfg.attention_width, cfg.kv_width] if grouped else [cfg.attention_width]


def count_parameters(cfg: ModelConfig) -> ParameterCount:
    """Every parameter megatron-core's GPTModel allocates for this configuration."""
    d, layers = cfg.hidden_size, cfg.num_layers
    qkv_out = cfg.attention_width + 2 * cfg.kv_width
    biases = 1 if cfg.linear_bias else 0
    attention_per_layer = d * qkv_out + cfg.attention_width * d + biases * (qkv_out + d)
    feature_maps = sum(w * w + w for w in supra_feature_map_widths(cfg)) * len(cfg.linear_attention_layers())
    per_norm = 2 * d if cfg.normalization == "LayerNorm" else d  # RMSNorm has a scale and no bias
    return ParameterCount(
        embedding=cfg.vocab_size * d,
        attention=layers * attention_per_layer + feature_maps,
        layernorm=(2 * layers + 1) * per_norm,
        ffn_weights=ffn_weight_params(cfg),
        ffn_biases=biases * layers * sum(m for _, m in cfg.ffn_shapes()),
        output_layer=0 if cfg.tie_embeddings else cfg.vocab_size * d,
    )


def attention_score_flops(cfg: ModelConfig, layer: int, heads: int | None = None) -> int:
    """Forward FLOPs per token of one layer's attention over its context (softmax or SUPRA's chunked form)."""
    width = cfg.attention_width if heads is None else heads * cfg.kv_channels
    if cfg.is_linear_attention(layer):
        chunk = min(cfg.supra.chunk_size, cfg.seq_length)
        return 2 * 2 * width * (chunk + cfg.kv_channels)
    return 2 * 2 * cfg.seq_length * width


def supra_feature_map_flops(cfg: ModelConfig, layer: int) -> int:
    """Forward FLOPs per token of a SUPRA layer's feature maps (applied to q and to k); 0 for softmax layers."""
    return 2 * (cfg.attention_width**2 + cfg.kv_width**2) if cfg.is_linear_attention(layer) else 0


def layer_forward_flops(
    cfg: ModelConfig, layer: int, *, heads: int | None = None, kv_groups: int | None = None, hidden: int | None = None
) -> ForwardFlops:
    """Forward FLOPs per token of decoder layer ``layer`` (0-based); no logits.

    ``heads``, ``kv_groups`` and ``hidden`` default to the full layer; a
    subnetwork that computes only some query heads, key/value groups and FFN
    hidden units (evolving subnetwork training) passes its counts, 0 for a
    skipped layer.
    """
    d, head_dim = cfg.hidden_size, cfg.kv_channels
    heads = cfg.num_attention_heads if heads is None else heads
    kv_groups = cfg.num_query_groups if kv_groups is None else kv_groups
    kind = cfg.ffn.structure if cfg.ffn.is_structured(layer) else "dense"
    feature_maps = supra_feature_map_flops(cfg, layer) if heads else 0
    return ForwardFlops(
        attention_projections=2 * (2 * heads * head_dim * d + 2 * kv_groups * head_dim * d) + feature_maps,
        attention_scores=attention_score_flops(cfg, layer, heads),
        ffn=2 * _ffn_weights(cfg, kind, hidden),
        logits=0,
    )


def forward_flops_per_token(cfg: ModelConfig) -> ForwardFlops:
    """Forward FLOPs per token (2 per multiply-add; norms, activations and softmax are not counted)."""
    layers = [layer_forward_flops(cfg, layer) for layer in range(cfg.num_layers)]
    return sum_forward_flops(layers, logits=2 * cfg.vocab_size * cfg.hidden_size)


def sum_forward_flops(layers: list[ForwardFlops], logits: int) -> ForwardFlops:
    """The model's forward FLOPs from its layers' and the output layer's."""
    return ForwardFlops(
        attention_projections=sum(f.attention_projections for f in layers),
        attention_scores=sum(f.attention_scores for f in layers),
        ffn=sum(f.ffn for f in layers),
        logits=logits,
    )


def training_flops_per_token(cfg: ModelConfig, *, extra_forward_flops_per_token: float = 0) -> float:
    """Training FLOPs per token: 3 × (model forward + any extra forward compute per token)."""
    return TRAINING_FLOPS_PER_FORWARD * (forward_flops_per_token(cfg).total + extra_forward_flops_per_token)


def training_run_flops(cfg: ModelConfig, tokens: int, *, extra_forward_flops: float = 0) -> RunFlops:
    """Training FLOPs of a run over ``tokens`` tokens plus ``extra_forward_flops`` in total (e.g. guides)."""
    if tokens < 0 or extra_forward_flops < 0:
        raise ValueError(f"tokens={tokens} and extra_forward_flops={extra_forward_flops} must be non-negative")
    return RunFlops(
        tokens=tokens,
        model=TRAINING_FLOPS_PER_FORWARD * forward_flops_per_token(cfg).total * tokens,
        extra=TRAINING_FLOPS_PER_FORWARD * extra_forward_flops,
    )


def guide_ffn_flops_per_token(cfg: ModelConfig) -> int:
    """Forward FLOPs per token of dense guides on every structured FFN layer.

    Self-guided training runs a dense copy of each structured layer with
    probability α; its expected extra cost is ``E[α]`` × guided tokens × this.
    """
    dense = _ffn_weights(cfg, "dense")
    return sum(2 * dense for kind in ffn_layer_kinds(cfg) if kind != "dense")


def model_flops_utilization(
    cfg: ModelConfig,
    tokens_per_second: float,
    peak_flops_per_second: float,
    *,
    extra_forward_flops_per_token: float = 0,
) -> float:
    """Achieved training FLOP/s (the paper's count) over the hardware's peak FLOP/s."""
    if peak_flops_per_second <= 0:
        raise ValueError(f"peak_flops_per_second={peak_flops_per_second} must be positive")
    achieved = training_flops_per_token(cfg, extra_forward_flops_per_token=extra_forward_flops_per_token)
    return achieved * tokens_per_second / peak_flops_per_second


def tokens_for_flops(cfg: ModelConfig, flops: float) -> float:
    """Tokens a model trains on for a FLOP budget (to compare models at equal training compute)."""
    return flops / training_flops_per_token(cfg)


def dense_counterpart(cfg: ModelConfig) -> ModelConfig:
    """The same model with dense FFNs: the reference for parameter ratios and token budgets."""
    return dataclasses.replace(cfg, ffn=FFNConfig(dense_layers=list(cfg.ffn.dense_layers)))
