"""Process-group set-up and tear-down shared by the trainer, the tools and the tests."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .. import cpu_compat


def initialize_model_parallel(tensor_parallel: int = 1, pipeline_parallel: int = 1) -> None:
    """Initialise torch.distributed (once) and megatron's parallel_state for the given TP x PP.

    NCCL with one GPU per local rank when CUDA is present, gloo on the CPU
    otherwise.  Outside torchrun (no ``WORLD_SIZE``) a one-process group is
    created in memory, so single-process tools and tests need no ports.  The
    parallel state is rebuilt on every call, which lets one process run
    several layouts in sequence; the data-parallel size is whatever the world
    size leaves over.
    """
    from megatron.core import parallel_state

    cpu_compat.enable_if_no_cuda()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    world = dist.get_world_size()
    if tensor_parallel < 1 or pipeline_parallel < 1 or world % (tensor_parallel * pipeline_parallel):
        raise ValueError(
            f"tensor_parallel={tensor_parallel} x pipeline_parallel={pipeline_parallel} does not divide "
            f"the world size {world}"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=pipeline_parallel
    )


def close_process_group() -> None:
    """Destroy the process group if one was started: a command's last step, also after a failure, so that
    no rank exits with its collectives' resources still held."""
    if dist.is_initialized():
        dist.destroy_process_group()


def seed_model_parallel(seed: int) -> None:
    """Seed the default generator and megatron's named RNG streams (data- and model-parallel).

    Call after :func:`initialize_model_parallel`: the model-parallel stream's
    seed depends on the tensor-parallel rank.
    """
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
