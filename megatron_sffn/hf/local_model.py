"""Our GPTModel whole in one process (TP=1, PP=1, local backend, CPU), the form interop works on.

dist_checkpointing reshards on load, so a checkpoint saved at any layout
loads into this model, and one saved from it loads at any layout.
"""

from __future__ import annotations

import os

import torch.distributed as dist

from ..config.model import ModelConfig


def single_process_model(model_cfg: ModelConfig):
    """An uninitialised fp32 TP=1 model of ``model_cfg``, its weights to be loaded or filled in.

    Run outside torchrun: the one-process gloo group lives in memory (no
    ports), and the model is moved to the CPU if the builder put it on a GPU.
    """
    from ..model import build_gpt_model, initialize_model_parallel, seed_model_parallel, transformer_config

    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise ValueError("Hugging Face interop runs in a single process; launch it without torchrun")
    if not dist.is_initialized():  # gloo even on a GPU machine: the tensors stay in host memory
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    initialize_model_parallel(1, 1)
    seed_model_parallel(0)  # megatron's RNG streams must exist to build; no weight is drawn
    config = transformer_config(model_cfg, perform_initialization=False, fused_kernels=False)
    model = build_gpt_model(model_cfg, config=config, backend="local")
    return model.cpu().eval()
