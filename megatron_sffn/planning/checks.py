"""The checks of a run config that need more than the config: the sharding plan, the SGT accounting, the EST draws.

The config package is a leaf, so :class:`~megatron_sffn.config.train.TrainConfig`
checks only what it can see itself; these run in the preflight
(:func:`megatron_sffn.train.preflight`), in the dry run and at the start of
training, before any process group or weight exists.  Each error names the
keys at fault.
"""

from __future__ import annotations

from ..config.loading import ConfigError
from ..config.train import TrainConfig
from ..est import plan_problems
from .memory import ffn_shape
from .steps import run_sgt_steps


def check_run_config(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` for a structured FFN TP cannot split, SGT steps that cannot be solved,
    or an EST plan that cannot be drawn at the layout."""
    check_tensor_parallel_ffn(cfg)
    try:
        run_sgt_steps(cfg)
    except ValueError as exc:
        raise ConfigError(f"sgt: {exc}") from exc
    if cfg.est.enabled:
        problems = plan_problems(cfg.model, cfg.est, cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel)
        if problems:
            raise ConfigError("\n".join(problems))


def check_tensor_parallel_ffn(cfg: TrainConfig) -> None:
    """The structured FFN splits over ``parallel.tensor_parallel`` by the sharding code's own rules
    (whole blocks per rank, BlockShuffle's per-block widths, an explicit ``tp_strategy``)."""
    model, tp = cfg.model, cfg.parallel.tensor_parallel
    ffn = model.ffn
    if tp == 1 or ffn.structure == "dense":
        return
    # Imported here: the sharding package loads megatron-core, which only a tensor-parallel run needs.
    from ..parallel.plan import choose_strategy, require_shardable

    shape = ffn_shape(model, ffn.structure)
    try:
        require_shardable(shape, tp)
        choose_strategy(shape, tp, ffn.tp_strategy)
    except ValueError as exc:
        raise ConfigError(
            f"model.ffn (structure={ffn.structure}, rank={ffn.rank}, blocks={ffn.blocks}, "
            f"tp_strategy={ffn.tp_strategy}) cannot be split over parallel.tensor_parallel={tp}: {exc}"
        ) from exc
