"""Bytes one process of a run holds: parameters per rank, optimizer state and the activations kept for backward.

Memory model (per process, bytes; the worst pipeline stage decides)
-------------------------------------------------------------------
Static, per parameter held by the rank (its TP shard of its PP stage):

=========== ======================== =====================================
            bf16 (GPU default)        fp32 (CPU default)
=========== ======================== =====================================
weights     2                         4
gradients   4 (fp32 reduce buffer)    4
optimizer   12 / DP* (fp32 master     8 / DP* (Adam moments)
            copy + Adam moments)
=========== ======================== =====================================

(*) divided by the data-parallel size only with the distributed optimizer.
This is megatron-core's layout as the trainer configures it
(``grad_reduce_in_fp32``, ``Float16Module``, megatron's optimizers).

Activations are what autograd keeps for the backward pass, counted tensor by
tensor for this architecture (pre-LN, RoPE, fused-softmax-free attention, no
dropout), per token of a micro-batch and per layer, with ``e`` bytes per
element (2 in bf16, 4 in fp32), ``t`` the TP size and no sequence
parallelism (so norm inputs and outputs are replicated over TP):

* ``4·h·e``: both norms' inputs and outputs (outputs are the next linear's saved input);
* ``(2·d_attn + 2·d_kv)/t·e``: q, k (after RoPE), v and the attention output kept by
  ``scaled_dot_product_attention``, plus ``d_attn/t·e`` for the output projection's
  input and ``heads/t·4`` for the softmax log-sum-exp;
* ``(fc1_out + f)/t·e``: the FFN activation's input and output;
* structured FFNs add their inner features, one vector per linear: the rank R for
  LowRank and BlockDense (gathered over TP); for BlockShuffle the whole middle
  vector d of fc1 (its rows of every group read all of it; ``split/reduce``
  also keeps its d/t input slice) and fc2's d/t slice;
* 16 bytes of fp32 norm statistics.

A SUPRA layer ("Linearizing Large Language Models", Mercat et al., 2024)
keeps instead of the softmax attention's tensors: the feature maps' inputs,
all-gathered over TP (``(d_attn + d_kv)·e``), the ReLU outputs
(``(d_attn + d_kv)/t·e``), fp32 q, k, v after RoPE and the GQA
repeat (``3·d_attn/t·4``), the chunk's score matrices (``2·C·heads/t·4``),
the chunk states amortised per token (``2·heads·d_head²/(C·t)·4``), the fp32
outputs before and after GroupNorm and the projection input.  Selective
recomputation does not apply to it.

The last stage adds the final norm, the fp32 logits that the cross entropy
keeps (``V/t·4``, plus the ``V/t·e`` copy that bf16 casts through) and, at
the start of the backward pass, the output layer's weight gradient and input
gradient.  Recomputation: ``selective`` drops the attention output and
log-sum-exp (megatron recomputes core attention); ``full`` keeps one input
per checkpointed chunk and rematerialises one chunk at a time.  With
pipeline parallelism, stage ``s`` of ``p`` holds ``min(p - s, micro-batches)``
micro-batches in flight (1F1B schedule).

The estimate is of allocated tensor bytes, the quantity
``torch.cuda.max_memory_allocated`` reports; the CUDA context, NCCL buffers and
allocator fragmentation come on top, which is why a plan above 90% of the
device is flagged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..accounting.model import ffn_layer_kinds, supra_feature_map_widths
from ..config.model import ModelConfig
from ..config.train import TrainConfig
from ..parallel.plan import FFNShape, choose_strategy, rank_cost, saved_features_per_token

_GIB = 1024**3
_FP32 = 4


def format_gib(n: float) -> str:
    """Bytes as GiB, or MiB below a tenth of a GiB."""
    return f"{n / _GIB:.2f} GiB" if n >= 0.1 * _GIB else f"{n / 1024**2:.1f} MiB"


@dataclass(frozen=True)
class StageMemory:
    """Bytes one process of pipeline stage ``stage`` holds at its peak."""

    stage: int
    first_layer: int
    last_layer: int
    params: int  # parameters on one rank of this stage
    weights: int
    gradients: int
    optimizer: int
    activations_per_micro_batch: int  # with the configured recomputation
    activations_no_recompute: int
    activations_full_recompute: int
    in_flight: int
    output_and_loss: int  # final norm, logits and the backward's first gradients (last stage)

    @property
    def activations(self) -> int:
        return self.in_flight * self.activations_per_micro_batch + self.output_and_loss

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations


def _ffn_params_per_rank(model: ModelConfig, kind: str, tp: int) -> int:
    """FFN weights and biases one TP rank holds; structured factors follow the TP plan the modules use
    (``model.ffn.tp_strategy``, whose divisibility :func:`.checks.check_run_config` has already checked)."""
    shape = ffn_shape(model, kind)
    return rank_cost(shape, choose_strategy(shape, tp, model.ffn.tp_strategy), tp).params


def ffn_shape(model: ModelConfig, kind: str) -> FFNShape:
    """The FFN as the TP sharding plan sees it (``kind`` of one layer: dense or the model's structure)."""
    return FFNShape(
        kind,
        model.hidden_size,
        model.ffn_hidden_size,
        model.ffn.rank,
        model.ffn.blocks,
        gated=model.activation == "swiglu",
    )


def _layer_params_per_rank(model: ModelConfig, layer: int, tp: int) -> int:
    """One decoder layer's parameters on one TP rank (norms and row-parallel biases are replicated;
    SUPRA's feature maps are column-parallel)."""
    d = model.hidden_size
    qkv = model.attention_width + 2 * model.kv_width
    attention = (d * qkv + qkv) // tp + model.attention_width * d // tp + d
    if model.is_linear_attention(layer):
        attention += sum(w * w + w for w in supra_feature_map_widths(model)) // tp
    return 2 * 2 * d + attention + _ffn_params_per_rank(model, ffn_layer_kinds(model)[layer], tp)


def stage_layers(num_layers: int, pp: int, stage: int) -> range:
    per_stage = num_layers // pp
    return range(stage * per_stage, (stage + 1) * per_stage)


def stage_params_per_rank(model: ModelConfig, tp: int, pp: int, stage: int) -> int:
    """Parameters on one rank of ``stage``: its layers, plus the embedding (first) and output side (last).

    With pipeline parallelism a tied output layer is a second copy of the
    embedding on the last stage (megatron keeps the two in sync by reducing
    their gradients), so it counts there too.
    """
    d, vocab = model.hidden_size, model.vocab_size
    params = sum(_layer_params_per_rank(model, i, tp) for i in stage_layers(model.num_layers, pp, stage))
    if stage == 0:
        params += vocab * d // tp
    if stage == pp - 1:
        params += 2 * d
        if not model.tie_embeddings or pp > 1:
            params += vocab * d // tp
    return params


# -- activations ------------------------------------------------------------------------------------


def _supra_attention_bytes_per_token(model: ModelConfig, tp: int, element_bytes: int) -> int:
    """What a SUPRA layer's attention keeps per token (see the module docstring); it has no selective recompute."""
    e, heads, width = element_bytes, model.num_attention_heads // tp, model.attention_width // tp
    chunk = min(model.supra.chunk_size, model.seq_length)
    qk = model.attention_width + model.kv_width
    kept = qk * e + qk // tp * e  # the feature maps' all-gathered inputs, their ReLU outputs
    kept += 3 * width * _FP32 + 2 * chunk * heads * _FP32  # fp32 q, k, v; intra-chunk scores
    kept += 2 * heads * model.kv_channels**2 // chunk * _FP32  # chunk states, amortised over the chunk
    return kept + 2 * width * _FP32 + width * e  # pre- and post-GroupNorm outputs, projection input


def layer_activation_bytes_per_token(
    model: ModelConfig, layer: int, tp: int, element_bytes: int, selective_recompute: bool = False
) -> int:
    """Bytes one decoder layer keeps per token for the backward pass (see the module docstring)."""
    d, e = model.hidden_size, element_bytes
    (_, fc1_out), _ = model.ffn_shapes()
    kind = ffn_layer_kinds(model)[layer]
    norms = 4 * d * e + 2 * 2 * _FP32
    if model.is_linear_attention(layer):
        attention = _supra_attention_bytes_per_token(model, tp, e)
    else:
        attention = (2 * model.attention_width + 2 * model.kv_width) // tp * e + model.attention_width // tp * e
        attention += model.num_attention_heads // tp * _FP32
        if selective_recompute:
            attention -= model.attention_width // tp * e + model.num_attention_heads // tp * _FP32
    ffn = (fc1_out + model.ffn_hidden_size) // tp * e + saved_features_per_token(
        ffn_shape(model, kind), tp, model.ffn.tp_strategy
    ) * e
    return norms + attention + ffn


def stage_activation_bytes(
    cfg: TrainConfig,
    stage: int,
    element_bytes: int,
    recompute: str | None,
    method: str | None = None,
    recompute_layers: int | None = None,
) -> int:
    """Activations of one micro-batch on one rank of ``stage`` under a recomputation setting."""
    model, tp, pp = cfg.model, cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel
    tokens = cfg.training.micro_batch_size * model.seq_length
    layers = stage_layers(model.num_layers, pp, stage)
    selective = recompute == "selective"
    per_layer = [layer_activation_bytes_per_token(model, i, tp, element_bytes, selective) for i in layers]
    if recompute != "full":
        return tokens * sum(per_layer)
    checkpoint_input = model.hidden_size * element_bytes
    if method == "block":  # the first N layers keep only their input, the others everything
        n = min(recompute_layers, len(per_layer))
        kept = n * checkpoint_input + sum(per_layer[n:])
        return tokens * max(kept, n * checkpoint_input + max(per_layer))
    chunks = math.ceil(len(per_layer) / recompute_layers)  # uniform: one input per chunk, one chunk rebuilt
    rebuilt = max(sum(per_layer[i : i + recompute_layers]) for i in range(0, len(per_layer), recompute_layers))
    return tokens * (chunks * checkpoint_input + rebuilt)


def output_and_loss_bytes(cfg: TrainConfig, element_bytes: int) -> int:
    """Last stage: final norm and fp32 logits kept by the loss, then the output layer's first gradients."""
    model, tp = cfg.model, cfg.parallel.tensor_parallel
    tokens = cfg.training.micro_batch_size * model.seq_length
    d, vocab_shard = model.hidden_size, model.vocab_size // tp
    cast_copy = element_bytes if element_bytes != _FP32 else 0
    kept = tokens * (2 * d * element_bytes + 2 * _FP32 + vocab_shard * (_FP32 + cast_copy))
    first_gradients = vocab_shard * d * element_bytes + tokens * d * element_bytes
    return kept + first_gradients


def in_flight_micro_batches(pp: int, stage: int, micro_batches: int) -> int:
    """Micro-batches whose activations stage ``stage`` holds at once under 1F1B (one without pipelining)."""
    return 1 if pp == 1 else min(pp - stage, micro_batches)


def static_bytes_per_param(bf16: bool, distributed_optimizer: bool, dp: int) -> tuple[float, float, float]:
    """Bytes per parameter held for weights, gradients and optimizer state (see the table above)."""
    weights = bytes_per_element(bf16)
    optimizer = (12 if bf16 else 8) / (dp if distributed_optimizer else 1)
    return weights, _FP32, optimizer


def bytes_per_element(bf16: bool) -> int:
    """Bytes of one weight or activation element: bf16 or fp32."""
    return 2 if bf16 else _FP32
