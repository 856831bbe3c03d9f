"""Build megatron-core's ``GPTModel`` from a :class:`ModelConfig`."""

from __future__ import annotations

import torch

from .. import cpu_compat
from ..config import ModelConfig
from .layer_specs import Backend, decoder_block_spec
from .transformer_config import transformer_config


def build_gpt_model(
    model_cfg: ModelConfig,
    *,
    config=None,
    backend: Backend = "auto",
    vp_stage: int | None = None,
    subnetworks: bool = False,
):
    """This rank's part of the GPT (its pipeline stage, its tensor-parallel shard).

    Architecture of the paper: pre-LN with biases, RoPE, causal attention
    (GQA when ``num_query_groups`` < heads), GELU-tanh or SwiGLU FFNs that are
    structured per layer, input/output embeddings tied unless
    ``model_cfg.tie_embeddings`` is False.  ``config`` defaults to
    :func:`transformer_config` of ``model_cfg``; parallel_state must be
    initialised (see :func:`initialize_model_parallel`) and seeded first.
    The structured FFNs' tensor-parallel plan comes from
    ``model_cfg.ffn.tp_strategy`` (see ``megatron_sffn.parallel.plan``).
    ``subnetworks`` builds layers that can run a drawn subnetwork of
    themselves (evolving subnetwork training; same parameters).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    cpu_compat.enable_if_no_cuda()
    config = config or transformer_config(model_cfg)
    model = GPTModel(
        config=config,
        transformer_layer_spec=decoder_block_spec(model_cfg, config, backend, vp_stage, subnetworks),
        vocab_size=model_cfg.vocab_size,
        max_sequence_length=model_cfg.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        parallel_output=True,
        share_embeddings_and_output_weights=model_cfg.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=model_cfg.rope_base,
        vp_stage=vp_stage,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model
