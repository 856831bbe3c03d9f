"""The one place that wires FFN linears into megatron's ``MLP`` spec.

megatron-core 0.18+ changes the MLP slot's callable signature; keeping the
integration here means an upgrade touches this file only.
"""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from .blockdense import BlockDenseFC1, BlockDenseFC2
from .blockshuffle import BlockShuffleFC1, BlockShuffleFC2
from .lowrank import LowRankFC1, LowRankFC2

STRUCTURED_LINEARS = {
    fc1.kind: (fc1, fc2)
    for fc1, fc2 in ((LowRankFC1, LowRankFC2), (BlockDenseFC1, BlockDenseFC2), (BlockShuffleFC1, BlockShuffleFC2))
}


def mlp_spec(
    model_cfg: ModelConfig,
    layer_number: int,
    *,
    tp_strategy: str | None = None,
    provider: Any = None,
    fuse_norm: bool = True,
):
    """``ModuleSpec`` of the MLP of layer ``layer_number`` (0-based).

    Structured layers get this package's fc1/fc2 with the FFN's options as
    ``params``; dense layers get megatron's column/row parallel linears.
    The tensor-parallel plan is ``model_cfg.ffn.tp_strategy`` (``"auto"``: the
    choice of :mod:`.plan`); ``tp_strategy`` overrides it (e.g.
    ``"replicated/reduce"``).

    ``provider`` (a megatron backend spec provider, e.g. Transformer Engine's)
    supplies the dense layers' linears; when it fuses the pre-MLP norm into
    fc1 (``provider.column_parallel_layer_norm_linear()``), dense layers get
    that fused fc1 (unless ``fuse_norm`` is False).  A structured fc1 never applies the norm: a layer whose
    fc1 is not the provider's fused linear must keep a separate
    ``pre_mlp_layernorm`` module, or its FFN silently runs without pre-LN.
    """
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    if not model_cfg.ffn.is_structured(layer_number):
        fc1, fc2 = _dense_linears(provider, fuse_norm)
        return ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=fc2))
    ffn = model_cfg.ffn
    fc1, fc2 = STRUCTURED_LINEARS[ffn.structure]
    params = {
        "rank": ffn.rank,
        "blocks": ffn.blocks,
        "init": ffn.init,
        "std": model_cfg.init_std,
        "tp_strategy": tp_strategy or ffn.tp_strategy,
    }
    return ModuleSpec(
        module=MLP,
        submodules=MLPSubmodules(
            linear_fc1=ModuleSpec(module=fc1, params=params), linear_fc2=ModuleSpec(module=fc2, params=params)
        ),
    )


def _dense_linears(provider: Any, fuse_norm: bool) -> tuple[Any, Any]:
    if provider is None:
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        return ColumnParallelLinear, RowParallelLinear
    fuse = fuse_norm and provider.fuse_layernorm_and_linear()
    fc1 = provider.column_parallel_layer_norm_linear() if fuse else None
    return fc1 or provider.column_parallel_linear(), provider.row_parallel_linear()
