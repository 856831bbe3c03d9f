"""SUPRA linear attention for megatron-core's ``self_attention`` spec slot.

"Linearizing Large Language Models" (Mercat et al., 2024) turns a pretrained
softmax layer into a linear-attention RNN.  The inherited ``linear_qkv`` and
``linear_proj`` keep their weights; per layer the order is:

1. q, k, v from ``linear_qkv`` (megatron's own split, GQA included);
2. feature map ``ReLU(W x + b)`` over the flattened all-head vector (it mixes
   heads): one square matrix shared by q and k, or with GQA a query-width one
   for q and a kv-width one for k (as the reference code);
3. k and v repeated to the query heads (query head h reads kv head h // (H/H_kv));
4. RoPE after the ReLU (rotate-half, fp32 angles: in bf16 the reference's
   own table is off by 0.36 at position 2048), then k × 1/√head_dim;
5. decayed causal linear attention with fixed per-head decays, no softmax
   denominator (``megatron_sffn.linear_attention``);
6. GroupNorm per token and head (no affine, eps 1e-5), then ``linear_proj``.

Tensor parallelism: megatron splits heads over ranks.  The feature map mixes
heads, so each rank all-gathers its q (and k) slice to the full vector and
applies a column-parallel ``W`` that produces only its own heads' features;
the backward of the gather keeps the rank's slice of the (all-reduced) input
gradient.  The result is TP-exact: every rank holds the same full weight at
any TP size (CPU initialisation).  Decays are indexed by global head.

Decoding: megatron's static inference context holds this layer's recurrent
state ``[batch, heads, d_k, d_v]`` in ``key_value_memory_dict[layer_number]``,
where softmax layers keep their KV cache; a call at ``sequence_len_offset``
0 (prefill) starts from a zero state and runs the chunked form, later calls
continue from the stored state (one token: a recurrent step).
"""

from __future__ import annotations

import functools
import math

import torch

from ..config.model import SupraConfig
from ..linear_attention import decay_attention, log_decays
from .init_streams import init_stream

GROUP_NORM_EPS = 1e-5
# Streams of the new weights, apart from the layers' own: a SUPRA model built
# from a seed has the same inherited weights as the softmax model of that seed.
_FEATURE_MAP_STREAM_BASE = 1 << 20


def feature_map_stream(layer_number: int) -> int:
    return _FEATURE_MAP_STREAM_BASE + layer_number


def torch_default_linear_init(weight: torch.Tensor) -> torch.Tensor:
    """``torch.nn.Linear``'s default weight init (the paper initialises the new weights so)."""
    return torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


class HeadGroupNorm(torch.nn.Module):
    """GroupNorm with one group per head, per token, without affine parameters (biased variance)."""

    def __init__(self, eps: float = GROUP_NORM_EPS) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x, x.shape[-1:], eps=self.eps)


@functools.cache
def supra_attention_class() -> type:
    """The SUPRA attention module class (built lazily: megatron imports take seconds)."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.parallel_state import get_tensor_model_parallel_rank
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.tensor_parallel.mappings import (
        gather_from_tensor_model_parallel_region,
    )
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.utils import deprecate_inference_params

    class SupraSelfAttention(SelfAttention):
        """Self-attention with SUPRA's linear attention in place of softmax (same weights, plus feature maps)."""

        def __init__(self, config, submodules, layer_number: int, *, supra: SupraConfig, **kwargs) -> None:
            super().__init__(config, submodules, layer_number, **kwargs)
            tp = self.world_size
            if config.num_query_groups < tp:
                raise ValueError(
                    f"SUPRA attention needs num_query_groups={config.num_query_groups} >= tensor_parallel={tp}"
                )
            if config.sequence_parallel or config.context_parallel_size != 1:
                raise ValueError("SUPRA attention supports neither sequence nor context parallelism")
            self.supra = supra
            self.head_dim = self.hidden_size_per_attention_head
            rank = get_tensor_model_parallel_rank()
            with init_stream(feature_map_stream(layer_number)):
                self.feature_map = self._new_linear(self.query_projection_size, rank)
                grouped = config.num_query_groups < config.num_attention_heads
                self.feature_map_k = self._new_linear(self.kv_projection_size, rank) if grouped else None
            heads = self.num_attention_heads_per_partition
            first = rank * heads
            decays = log_decays(supra.decay, config.num_attention_heads)[first : first + heads]
            self.register_buffer("log_decay", decays.float(), persistent=False)
            self.head_norm = HeadGroupNorm()

        def _new_linear(self, width: int, rank: int):
            """Column-parallel ``width → width`` map with torch's default init of weight and bias."""
            linear = ColumnParallelLinear(
                width,
                width,
                config=self.config,
                init_method=torch_default_linear_init,
                bias=True,
                gather_output=False,
                skip_bias_add=False,
                tp_group=self.pg_collection.tp,
            )
            bound = 1.0 / math.sqrt(width)
            full = torch.empty(width).uniform_(-bound, bound)
            with torch.no_grad():
                linear.bias.copy_(full.chunk(self.world_size)[rank].to(linear.bias.dtype))
            return linear

        def new_submodule_names(self) -> list[str]:
            """The submodules SUPRA adds to a softmax layer (names relative to this module)."""
            return [name for name in ("feature_map", "feature_map_k") if getattr(self, name) is not None]

        def new_parameter_names(self) -> list[str]:
            """The parameters SUPRA adds to a softmax layer (names relative to this module)."""
            return [
                f"{sub}.{name}"
                for sub in self.new_submodule_names()
                for name, _ in getattr(self, sub).named_parameters()
            ]

        def _features(self, x: torch.Tensor, linear) -> torch.Tensor:
            """``ReLU(W x + b)`` of the full all-head vector, this rank's heads: [s, b, heads, d]."""
            s, b = x.shape[:2]
            full = gather_from_tensor_model_parallel_region(x.reshape(s, b, -1))
            out, _ = linear(full)
            return torch.relu(out).view(s, b, -1, self.head_dim)

        def _rotate(self, t: torch.Tensor, rotary_pos_emb, offset: int) -> torch.Tensor:
            freqs = rotary_pos_emb[offset : offset + t.shape[0]]
            return apply_rotary_pos_emb(t, freqs, config=self.config, cp_group=self.pg_collection.cp)

        def forward(
            self,
            hidden_states: torch.Tensor,
            attention_mask: torch.Tensor | None,
            key_value_states=None,
            inference_context=None,
            rotary_pos_emb=None,
            rotary_pos_cos=None,
            rotary_pos_sin=None,
            rotary_pos_cos_sin=None,
            attention_bias=None,
            packed_seq_params=None,
            sequence_len_offset=None,
            *,
            inference_params=None,
        ):
            """Same contract as ``SelfAttention.forward``; ``attention_mask`` is ignored (always causal)."""
            inference_context = deprecate_inference_params(inference_context, inference_params)
            if packed_seq_params is not None or attention_bias is not None:
                raise ValueError("SUPRA attention supports neither packed sequences nor attention bias")
            if inference_context is not None and not inference_context.is_static_batching():
                raise ValueError("SUPRA attention decodes with megatron's StaticInferenceContext only")
            query, key, value = self.get_query_key_value_tensors(hidden_states, key_value_states)
            query = self._features(query, self.feature_map)
            key = self._features(key, self.feature_map_k or self.feature_map)
            repeat = query.shape[2] // key.shape[2]
            key, value = (t.repeat_interleave(repeat, dim=2) for t in (key, value))
            offset = 0 if inference_context is None else inference_context.sequence_len_offset
            query, key, value = (t.float() for t in (query, key, value))
            if rotary_pos_emb is not None:
                q_freqs, k_freqs = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
                query, key = self._rotate(query, q_freqs, offset), self._rotate(key, k_freqs, offset)
            key = key / math.sqrt(self.head_dim)
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
            out, state = decay_attention(
                q, k, v, self.log_decay, self.supra.chunk_size, self._initial_state(inference_context, q, v)
            )
            if inference_context is not None:
                self._store_state(inference_context, state)
            out = self.head_norm(out).to(hidden_states.dtype)
            s, b = hidden_states.shape[:2]
            return self.linear_proj(out.permute(2, 0, 1, 3).reshape(s, b, -1))

        def _batch_slice(self, inference_context, batch: int) -> slice:
            start = inference_context.batch_size_offset
            return slice(start, start + batch)

        def _initial_state(self, inference_context, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
            """The stored state when continuing a sequence; None (zeros) at a prefill."""
            if inference_context is None or inference_context.sequence_len_offset == 0:
                return None
            memory = inference_context.key_value_memory_dict.get(self.layer_number)
            if memory is None:
                raise ValueError(
                    f"layer {self.layer_number}: no recurrent state in the inference context at "
                    f"sequence_len_offset={inference_context.sequence_len_offset}; prefill at offset 0 first"
                )
            return memory[self._batch_slice(inference_context, q.shape[0])]

        def _store_state(self, inference_context, state: torch.Tensor) -> None:
            memory = inference_context.key_value_memory_dict.get(self.layer_number)
            if memory is None:
                shape = (inference_context.max_batch_size, *state.shape[1:])
                memory = torch.zeros(shape, dtype=torch.float32, device=state.device)
                inference_context.key_value_memory_dict[self.layer_number] = memory
            memory[self._batch_slice(inference_context, state.shape[0])] = state.detach()

    return SupraSelfAttention


def new_submodule_prefixes(model: torch.nn.Module) -> list[str]:
    """State-dict prefixes (``decoder.layers.0.self_attention.feature_map.``) of what SUPRA layers add to ``model``."""
    cls = supra_attention_class()
    return [
        f"{prefix}.{name}."
        for prefix, module in model.named_modules()
        if isinstance(module, cls)
        for name in module.new_submodule_names()
    ]
