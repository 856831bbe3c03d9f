"""Per-layer ``ModuleSpec``s of the decoder: one spec per layer so that FFNs may differ by layer.

The paper keeps layer 0's FFN dense and structures the others, so the block
is described as a list of layer specs rather than one spec repeated.  The
MLP slot always comes from the FFN spec factory; this module only wires the
attention, the norms and the backend around it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Iterator, Literal

from .. import cpu_compat
from ..config import ModelConfig
from .init_streams import init_stream, layer_stream
from .supra_attention import supra_attention_class
from .transformer_config import transformer_engine_available

Backend = Literal["auto", "local", "te"]

# Checkpoint key of a separate norm, made to match Transformer Engine's fused
# layernorm-linear, so checkpoints move between the local and TE backends.
_INPUT_NORM_KEYS = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
_PRE_MLP_NORM_KEYS = {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


def spec_provider(backend: Backend = "auto"):
    """megatron's spec provider for ``backend``; ``auto`` picks TE when it is importable on a GPU."""
    if backend not in ("auto", "local", "te"):
        raise ValueError(f"backend={backend!r}; expected 'auto', 'local' or 'te'")
    use_te = transformer_engine_available() if backend == "auto" else backend == "te"
    if use_te:
        if not transformer_engine_available():
            raise ValueError("backend='te' needs Transformer Engine and a CUDA device")
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    from megatron.core.models.backends import LocalSpecProvider

    return LocalSpecProvider()


def _core_attention(provider) -> type:
    return cpu_compat.core_attention_class() if cpu_compat.is_active() else provider.core_attention()


_LAYER_CLASSES: dict[bool, type] = {}


def _layer_class(subnetworks: bool = False) -> type:
    """``TransformerLayer`` that initialises inside its own RNG stream (see ``init_streams``).

    With ``subnetworks`` it also runs a drawn subnetwork of itself (evolving
    subnetwork training): :meth:`select` picks its heads and hidden units, or
    skips it, in which case it passes the residual stream through unchanged.
    """
    if not _LAYER_CLASSES:
        from megatron.core.transformer.transformer_layer import TransformerLayer

        class TransformerLayerWithInitStream(TransformerLayer):
            def __init__(self, *args, init_stream_id: int, **kwargs) -> None:
                with init_stream(init_stream_id):
                    super().__init__(*args, **kwargs)

        class SubnetworkTransformerLayer(TransformerLayerWithInitStream):
            skipped = False

            def __init__(self, *args, **kwargs) -> None:
                # megatron logs every MLP subclass as an "Unknown MLP type" and then builds it with the
                # default TP group, which is the group it would have passed: the message is noise here.
                with _without_log_records("megatron.core.transformer.transformer_layer", "Unknown MLP type"):
                    super().__init__(*args, **kwargs)

            def select(self, draw) -> None:
                """This layer's part of a step's subnetwork (an ``est.LayerDraw``; None: the full layer)."""
                self.skipped = draw is not None and not draw.active
                self.self_attention.select_heads(draw.heads if draw is not None else None, draw.p_H if draw else 1.0)
                self.mlp.select_hidden(draw.hidden if draw is not None else None, draw.p_M if draw else 1.0)

            def forward(self, hidden_states, *args, **kwargs):
                if self.skipped:
                    return hidden_states, kwargs.get("context")
                return super().forward(hidden_states, *args, **kwargs)

        _LAYER_CLASSES.update({False: TransformerLayerWithInitStream, True: SubnetworkTransformerLayer})
    return _LAYER_CLASSES[subnetworks]


@contextlib.contextmanager
def _without_log_records(logger_name: str, prefix: str) -> Iterator[None]:
    """Drop the log records of ``logger_name`` whose message starts with ``prefix`` while inside."""
    logger = logging.getLogger(logger_name)

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(prefix)

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def layer_spec(model_cfg: ModelConfig, layer: int, provider, subnetworks: bool = False):
    """Spec of decoder layer ``layer`` (0-based): pre-LN attention (softmax or SUPRA), then the layer's FFN.

    Transformer Engine fuses a norm into the linear that follows it.  That is
    used for the QKV projection; the pre-MLP norm is fused only when the FFN's
    fc1 is TE's own layernorm-linear; a structured fc1 gets a separate norm
    module, otherwise the FFN would silently run without its pre-LN.

    ``subnetworks`` swaps in the layer, attention and MLP that can run a drawn
    subnetwork (``megatron_sffn.parallel.subnetwork``); their norms stay
    separate modules, because a sliced QKV or fc1 product cannot apply a
    fused norm.  Parameters and checkpoint keys are the same either way.
    """
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

    from ..parallel.mlp_spec import mlp_spec

    norm = provider.layer_norm(rms_norm=model_cfg.normalization == "RMSNorm")
    fuse = provider.fuse_layernorm_and_linear() and not subnetworks
    fused_norm_linear = provider.column_parallel_layer_norm_linear() if fuse else None
    mlp = mlp_spec(model_cfg, layer, provider=provider, fuse_norm=not subnetworks)
    # The pre-MLP norm is fused only when fc1 is exactly the provider's layernorm-linear.
    mlp_norm_fused = fused_norm_linear is not None and mlp.submodules.linear_fc1 is fused_norm_linear
    keys_map = {}
    if fused_norm_linear is None:
        keys_map.update(_INPUT_NORM_KEYS)
    if not mlp_norm_fused:
        keys_map.update(_PRE_MLP_NORM_KEYS)
    linear = model_cfg.is_linear_attention(layer)
    attention_class = supra_attention_class() if linear else SelfAttention
    if subnetworks:
        from ..parallel.subnetwork import SubnetworkMLP, SubnetworkSelfAttention

        attention_class, mlp = SubnetworkSelfAttention, dataclasses.replace(mlp, module=SubnetworkMLP)
    attention = ModuleSpec(
        module=attention_class,
        params={"attn_mask_type": AttnMaskType.causal, **({"supra": model_cfg.supra} if linear else {})},
        submodules=SelfAttentionSubmodules(
            linear_qkv=fused_norm_linear or provider.column_parallel_linear(),
            core_attention=IdentityOp if linear else _core_attention(provider),  # SUPRA computes its own
            linear_proj=provider.row_parallel_linear(),
            q_layernorm=IdentityOp,
            k_layernorm=IdentityOp,
        ),
    )
    return ModuleSpec(
        module=_layer_class(subnetworks),
        params={"init_stream_id": layer_stream(layer)},
        submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp if fused_norm_linear else norm,
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp if mlp_norm_fused else norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map,
        ),
    )


def decoder_block_spec(
    model_cfg: ModelConfig,
    config,
    backend: Backend = "auto",
    vp_stage: int | None = None,
    subnetworks: bool = False,
):
    """The ``TransformerBlockSubmodules`` of this pipeline stage: its slice of the per-layer specs."""
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    provider = spec_provider(backend)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    specs = [layer_spec(model_cfg, layer, provider, subnetworks) for layer in range(offset, offset + count)]
    final_norm = provider.layer_norm(rms_norm=model_cfg.normalization == "RMSNorm")
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=final_norm)
