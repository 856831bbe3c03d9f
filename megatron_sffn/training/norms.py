"""The global L2 norm of the model's parameters.

Each distinct parameter element is counted once: tensor-parallel replicas
(norm weights, row-parallel biases) only on TP rank 0, and the tied output
embedding of the last pipeline stage not at all (it is the first stage's
input embedding), then the squares are summed over the model-parallel group.
The norm is a cheap health signal for a run (TensorBoard
``train/params_norm``) and a witness that a skipped step left the weights
untouched.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


@torch.no_grad()
def params_l2_norm(model: list) -> float:
    """Collective over the model-parallel group; the same value on every rank of a replica."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    squares = torch.zeros((), dtype=torch.float64, device=next(model[0].parameters()).device)
    for chunk in model:
        for param in chunk.parameters():
            if param_is_not_shared(param) and param_is_not_tensor_parallel_duplicate(param):
                squares += torch.sum(param.detach().double() ** 2)
    dist.all_reduce(squares, group=parallel_state.get_model_parallel_group())
    return float(squares.sqrt())
