"""Parameter and FLOP accounting: what a model costs, and which structure sizes meet a parameter budget.

``paper`` (Table 1 of the paper, published and recomputed) is not imported
here because it depends on the presets, which depend on this package.
"""

from .model import (
    ForwardFlops,
    ParameterCount,
    RunFlops,
    count_parameters,
    dense_counterpart,
    ffn_layer_kinds,
    ffn_weight_params,
    forward_flops_per_token,
    guide_ffn_flops_per_token,
    model_flops_utilization,
    tokens_for_flops,
    training_flops_per_token,
    training_run_flops,
)
from .ratio import FFNSizes, ffn_param_ratio, paper_ffn_sizes, solve_ffn_sizes
from .sgt import SGTRunFlops, SGTSteps, same_flops_ratio, sgt_run_flops, sgt_steps

__all__ = [
    "FFNSizes",
    "ForwardFlops",
    "ParameterCount",
    "RunFlops",
    "SGTRunFlops",
    "SGTSteps",
    "count_parameters",
    "dense_counterpart",
    "ffn_layer_kinds",
    "ffn_weight_params",
    "ffn_param_ratio",
    "forward_flops_per_token",
    "guide_ffn_flops_per_token",
    "model_flops_utilization",
    "paper_ffn_sizes",
    "same_flops_ratio",
    "sgt_run_flops",
    "sgt_steps",
    "solve_ffn_sizes",
    "tokens_for_flops",
    "training_flops_per_token",
    "training_run_flops",
]
