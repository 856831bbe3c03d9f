"""Translate a :class:`ModelConfig` into megatron-core's ``TransformerConfig``."""

from __future__ import annotations

import functools
import importlib.util

import torch

from ..config import ModelConfig
from .init_streams import EMBEDDING_STREAM, NormalInStream


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def transformer_engine_available() -> bool:
    """Transformer Engine is usable only when it imports and a GPU is present."""
    return torch.cuda.is_available() and _importable("transformer_engine")


def _activation(model_cfg: ModelConfig):
    if model_cfg.activation == "swiglu":
        return torch.nn.functional.silu
    return functools.partial(torch.nn.functional.gelu, approximate="tanh")


def transformer_config(
    model_cfg: ModelConfig,
    *,
    params_dtype: torch.dtype = torch.float32,
    bf16: bool = False,
    use_cpu_initialization: bool = True,
    fused_kernels: bool | None = None,
    **overrides,
):
    """The paper's architecture as a ``TransformerConfig``; TP/PP sizes come from parallel_state.

    * every weight N(0, init_std²), the output projections included: the paper
      uses no depth-scaled residual init, unlike megatron's default; the
      embeddings draw from their own RNG stream (see ``init_streams``);
    * pre-LN LayerNorm with bias, biases on every linear, no dropout (RMSNorm
      and bias-free linears when the model config asks for them);
    * ``fused_kernels`` (default: when CUDA is present) turns on the fusions
      whose unfused maths is identical and whose kernels are installed:
      bias-dropout-add and bias-SwiGLU (TorchScript), masked softmax (Apex's
      ``scaled_masked_softmax_cuda``) and RoPE (Transformer Engine).  Bias-GELU
      stays unfused: megatron fuses only exact ``F.gelu`` and computes it with
      the tanh formula, so the same config would switch between erf and tanh
      GELU with the fusion flag; the paper's tanh GELU is passed explicitly.
      Persistent layer norm and gradient-accumulation fusion need Apex/TE
      kernels and stay off.  On the CPU none of these kernels exist.
    * ``use_cpu_initialization`` draws every full weight on the CPU from the
      seed before slicing, so a given seed yields the same model at any TP size
      (what makes TP=2-vs-TP=1 comparisons and TP-independent restarts exact);
    * checkpoints key each layer separately when the layers' FFNs differ
      (structured with dense layer 0, or SUPRA hybrids): megatron's default
      stacks all layers into one tensor per name, which cannot hold a dense
      and a structured FFN, or a layer with feature maps and one without.

    ``overrides`` go to ``TransformerConfig`` unchanged (e.g. recompute options).
    """
    from megatron.core import parallel_state
    from megatron.core.transformer import TransformerConfig
    from megatron.core.utils import init_method_normal

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    _check_divisible(model_cfg, tp, pp)
    fused = torch.cuda.is_available() if fused_kernels is None else fused_kernels
    init = init_method_normal(model_cfg.init_std)
    settings = dict(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        ffn_hidden_size=model_cfg.ffn_hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
        kv_channels=model_cfg.kv_channels,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.bfloat16 if bf16 else params_dtype,  # dtype of activations between stages
        params_dtype=params_dtype,
        bf16=bf16,
        normalization=model_cfg.normalization,
        layernorm_epsilon=model_cfg.layernorm_epsilon,
        add_bias_linear=model_cfg.linear_bias,
        add_qkv_bias=model_cfg.linear_bias,
        gated_linear_unit=model_cfg.activation == "swiglu",
        activation_func=_activation(model_cfg),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model_cfg.init_std,
        init_method=init,
        output_layer_init_method=init,
        embedding_init_method=NormalInStream(model_cfg.init_std, EMBEDDING_STREAM),
        apply_query_key_layer_scaling=False,
        attention_softmax_in_fp32=True,
        use_cpu_initialization=use_cpu_initialization,
        bias_activation_fusion=fused and model_cfg.activation == "swiglu",
        masked_softmax_fusion=fused and _importable("scaled_masked_softmax_cuda"),
        bias_dropout_fusion=fused,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=fused and transformer_engine_available(),
        hetereogenous_dist_checkpoint=layers_differ(model_cfg),
    )
    settings.update(overrides)
    return TransformerConfig(**settings)


def layers_differ(model_cfg: ModelConfig) -> bool:
    """Whether some layers hold other parameters than others (structured FFNs beside dense, SUPRA hybrids)."""
    kinds = {
        (model_cfg.ffn.is_structured(layer), model_cfg.is_linear_attention(layer))
        for layer in range(model_cfg.num_layers)
    }
    return len(kinds) > 1


def _check_divisible(model_cfg: ModelConfig, tp: int, pp: int) -> None:
    """Name the model dimension that a parallel layout cannot split, before megatron asserts."""
    pairs = [
        ("num_attention_heads", model_cfg.num_attention_heads, "tensor_parallel", tp),
        ("num_query_groups", model_cfg.num_query_groups, "tensor_parallel", tp),
        ("ffn_hidden_size", model_cfg.ffn_hidden_size, "tensor_parallel", tp),
        ("vocab_size", model_cfg.vocab_size, "tensor_parallel", tp),
        ("num_layers", model_cfg.num_layers, "pipeline_parallel", pp),
    ]
    for name, value, layout, size in pairs:
        if value % size:
            raise ValueError(f"model {name}={value} is not divisible by {layout}={size}")
