"""Save and restore the complete training state with megatron's ``dist_checkpointing``.

A checkpoint directory (see :mod:`.checkpoint_dirs` for how it becomes
visible atomically) holds, in megatron's ``torch_dist`` format:

``model``
    every parameter as a global tensor with its sharding recorded, so it
    loads at any tensor/pipeline/data-parallel layout (during self-guided
    training's guided phase this includes the dense guides, and ``optimizer``
    their moments; checkpoints after the switch-off hold neither);
``optimizer``
    AdamW moments (and fp32 master weights in bf16 runs), keyed to the model's
    global tensors;
``scheduler``, ``progress``, ``data``, ``sgt``, ``est``
    the LR schedule, the step / consumed-token counters, the data loader's
    position and the self-guided / evolving subnetwork training plans: small
    objects identical on every rank, written once;
``rng``
    each rank's generator states (:mod:`.rng`), one object per global rank.

Beside them, ``config.yaml`` is the resolved run configuration, so a
checkpoint can be evaluated or resumed without its run directory, and
``lr_schedule.json`` the learning-rate schedule the run follows (which a
resume must agree with, see ``training.schedule_on_resume``).

What moves between layouts
--------------------------
* Model weights: any TP x PP x DP (dense and structured layers describe their
  sharding to ``dist_checkpointing``).
* Optimizer state of the plain optimizer (the CPU default): it is keyed by the
  model's global tensors, so it reshards exactly like the weights; a run can
  resume at another TP, PP or DP size.
* Optimizer state of the distributed optimizer (the GPU default) is saved in
  megatron's ``fully_sharded_model_space`` form, which is also keyed by global
  tensors and reshards across TP, PP and DP.  Switching between the plain and
  the distributed optimizer on resume is not supported (different state
  layouts): load with the same ``parallel.use_distributed_optimizer``.  On the
  CPU the distributed optimizer cannot save checkpoints at all (megatron needs
  a GPU fused Adam for its state layout).
* Data loader position: global, so it continues exactly at any DP size.
* RNG states: per rank; restored only when world size, TP and PP are
  unchanged, otherwise re-seeded from ``training.seed`` and the step (a
  model without dropout draws no random numbers while training, so this
  changes nothing in the paper's configuration).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
import yaml

from ..config.loading import from_dict, save_config, to_dict
from ..config.model import ModelConfig
from ..config.train import TrainConfig
from .checkpoint_dirs import LATEST_FILE, CheckpointDirs, step_dir_name
from .faults import FaultPlan
from .rng import capture_rng_state, restore_rng_state
from .schedule import LRSchedule
from .state import TrainProgress

CHECKPOINT_FORMAT = "megatron-sffn/checkpoint-v1"
CONFIG_FILE = "config.yaml"
CHECKPOINTS_SUBDIR = "checkpoints"  # inside a run directory
# Reshardable across TP, PP and DP; megatron's own default for the distributed optimizer.
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_sharded_model_space"}


def current_layout() -> dict[str, int]:
    from megatron.core import parallel_state

    return {
        "world_size": dist.get_world_size(),
        "tensor_parallel": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_parallel": parallel_state.get_pipeline_model_parallel_world_size(),
        "data_parallel": parallel_state.get_data_parallel_world_size(),
    }


def _same_rank_layout(saved: dict[str, int]) -> bool:
    """Whether global rank r now plays the role rank r had when the checkpoint was saved."""
    now = current_layout()
    return all(saved.get(k) == now[k] for k in ("world_size", "tensor_parallel", "pipeline_parallel"))


def sharded_model_state(model_chunks: list) -> dict[str, Any]:
    from megatron.core.utils import unwrap_model

    if len(model_chunks) != 1:
        raise ValueError(f"expected one model chunk per rank (no virtual pipeline stages), got {len(model_chunks)}")
    return unwrap_model(model_chunks[0]).sharded_state_dict()


def _rng_object(state: Any):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject("rng_state", state, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


def _save_strategy():
    """torch_dist, with replicated tensors' writes spread over the data-parallel ranks."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    strategy = get_default_save_sharded_strategy("torch_dist")
    if parallel_state.get_data_parallel_world_size() > 1:
        strategy = FullyParallelSaveStrategyWrapper(
            strategy, parallel_state.get_data_parallel_group(with_context_parallel=True)
        )
    return strategy


def save_checkpoint(
    dirs: CheckpointDirs,
    *,
    config: TrainConfig,
    model: list,
    optimizer,
    scheduler,
    progress: TrainProgress,
    data_state: dict[str, Any],
    faults: FaultPlan | None = None,
    sgt_state: dict[str, Any] | None = None,
    lr_schedule: LRSchedule | None = None,
    est_state: dict[str, Any] | None = None,
) -> Path:
    """Collective: every rank calls it at the same step.  Returns the committed directory.

    ``sgt_state`` records the run's self-guided training plan (None without SGT),
    ``est_state`` its evolving subnetwork training plan (None without EST);
    ``lr_schedule`` the schedule the run follows (default: the config's).
    """
    from megatron.core import dist_checkpointing

    rank0 = dist.get_rank() == 0
    if rank0:
        dirs.begin(progress.step)
    dist.barrier()
    partial = dirs.partial_path(progress.step)
    model_state = sharded_model_state(model)
    state = {
        "format": CHECKPOINT_FORMAT,
        "layout": current_layout(),
        "model": model_state,
        "optimizer": optimizer.sharded_state_dict(model_state, metadata=_OPTIMIZER_METADATA),
        "scheduler": scheduler.state_dict(),
        "progress": progress.state_dict(),
        "data": data_state,
        "sgt": sgt_state,
        "est": est_state,
        "rng": _rng_object(capture_rng_state()),
    }
    dist_checkpointing.save(state, str(partial), sharded_strategy=_save_strategy())
    if rank0:
        save_config(config, partial / CONFIG_FILE)
        (lr_schedule or LRSchedule.of(config)).write(partial)
    if faults is not None:
        faults.maybe_pause_in_save(progress.step, partial)
    dist.barrier()
    if rank0:
        dirs.commit(progress.step)
        dirs.prune(config.checkpoint.keep_last)
    dist.barrier()
    return dirs.root / step_dir_name(progress.step)


def save_weights_checkpoint(dirs: CheckpointDirs, *, config: TrainConfig, model: list) -> Path:
    """Collective: a checkpoint of the weights alone at step 0 (no optimizer, schedule, data or RNG state).

    What an imported model becomes: :func:`load_checkpoint` without an
    optimizer reads it at any layout (evaluation, generation, or a new run's
    ``checkpoint.load``); resuming a run from it is not possible (there is no
    optimizer state to resume).
    """
    from megatron.core import dist_checkpointing

    progress = TrainProgress()
    rank0 = dist.get_rank() == 0
    if rank0:
        dirs.begin(progress.step)
    dist.barrier()
    partial = dirs.partial_path(progress.step)
    state = {
        "format": CHECKPOINT_FORMAT,
        "layout": current_layout(),
        "model": sharded_model_state(model),
        "progress": progress.state_dict(),
        "data": None,
        "sgt": None,
        "weights_only": True,
    }
    dist_checkpointing.save(state, str(partial), sharded_strategy=_save_strategy())
    if rank0:
        save_config(config, partial / CONFIG_FILE)
    dist.barrier()
    if rank0:
        dirs.commit(progress.step)
    dist.barrier()
    return dirs.root / step_dir_name(progress.step)


@dataclass
class RestoredState:
    """What a checkpoint gives back beyond the tensors loaded in place."""

    path: Path
    progress: TrainProgress
    data_state: dict[str, Any] | None
    layout: dict[str, int]
    rng_restored: bool


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from what a user may name: the checkpoint itself, or a run directory
    (or its ``checkpoints`` directory), meaning the checkpoint its ``latest`` names."""
    path = Path(path)
    if (path / "metadata.json").exists():
        return path
    for root in (path, path / CHECKPOINTS_SUBDIR):
        if (root / LATEST_FILE).exists():
            latest = CheckpointDirs(root).latest()
            if latest is not None:
                return latest
    raise ValueError(
        f"{path} is neither a checkpoint directory (with metadata.json) nor a run directory with "
        f"{CHECKPOINTS_SUBDIR}/{LATEST_FILE}"
    )


def resolve_step_checkpoint(run_dir: str | Path, step: int | None) -> Path:
    """The checkpoint of ``run_dir`` at ``step``; None: what :func:`resolve_checkpoint` finds (its latest).

    For the commands that read a trained run (generate, export) and take ``--step``.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    if step is None:
        return resolve_checkpoint(run_dir)
    path = run_dir / CHECKPOINTS_SUBDIR / step_dir_name(step)
    if not (path / "metadata.json").exists():
        raise ValueError(f"{run_dir} has no checkpoint of step {step} ({path} missing or incomplete)")
    return path


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(saved) | set(current))
    found = []
    for key in keys:
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}: checkpoint {a!r}, this run {b!r}")
    return found


def saved_model_config(checkpoint: Path) -> ModelConfig:
    """The model a checkpoint holds, with defaults for keys added since it was written."""
    path = checkpoint / CONFIG_FILE
    return from_dict(ModelConfig, yaml.safe_load(path.read_text(encoding="utf-8"))["model"], source=str(path))


def is_attention_swap(saved: ModelConfig, current: ModelConfig) -> bool:
    """Softmax weights starting a SUPRA model: the uptraining of "Linearizing Large Language Models"."""
    return saved.attention == "softmax" and current.attention == "supra"


def check_same_model(checkpoint: Path, config: TrainConfig, *, allow_attention_swap: bool = False) -> bool:
    """A checkpoint of another architecture fails here with the differing keys, not deep in a shape check.

    With ``allow_attention_swap`` (starting from weights, not resuming), a
    softmax checkpoint may start a SUPRA model of otherwise the same
    architecture; returns whether that is the case.  The ``supra`` options
    matter only to models that use them.
    """
    saved, current = saved_model_config(checkpoint), config.model
    swap = allow_attention_swap and is_attention_swap(saved, current)
    ignored = {"attention", "supra"} if swap else set()
    if saved.attention == current.attention == "softmax":
        ignored.add("supra")
    a, b = ({k: v for k, v in to_dict(m).items() if k not in ignored} for m in (saved, current))
    diffs = _differences(a, b, "model.")
    if diffs:
        raise ValueError(f"{checkpoint} holds a different model than this run's config: " + "; ".join(diffs))
    return swap


def read_checkpoint_header(path: str | Path) -> dict[str, Any]:
    """The checkpoint's small common objects (format, layout, progress, ...), without its tensors."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    if not (path / "metadata.json").exists():
        raise ValueError(f"{path} is not a checkpoint directory (no metadata.json written by dist_checkpointing)")
    common = dist_checkpointing.load_common_state_dict(str(path))
    if common.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {common.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    return common


_EXTRA_STATE = "._extra_state"


def check_module_markers(path: str | Path, model: list) -> None:
    """Collective: hand the checkpoint's ``_extra_state`` of every module that validates it to that module.

    Runs before any tensor is read, so that a module can refuse a checkpoint
    of another layout with its own explanation instead of a shape mismatch
    deep in ``dist_checkpointing`` (BlockShuffle refuses checkpoints written
    with block-major hidden units, a different FFN).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.utils import unwrap_model

    modules = dict(unwrap_model(model[0]).named_modules())

    def validates(key: str) -> bool:
        owner = modules.get(key.removesuffix(_EXTRA_STATE))
        return key.endswith(_EXTRA_STATE) and getattr(owner, "validates_extra_state", False)

    requested = {key: value for key, value in sharded_model_state(model).items() if validates(key)}
    if not requested:
        return
    loaded = dist_checkpointing.load(requested, str(path))  # also returns the checkpoint's common objects
    for key in requested:
        modules[key.removesuffix(_EXTRA_STATE)].set_extra_state(loaded[key])
def require_same_plan(mine: dict[str, Any], saved: dict[str, Any] | None, where: str, method: str, key: str) -> None:
    """A run resumes under the training plan its checkpoint was saved with, or its trajectory silently changes.

    ``method`` names the regime in messages ("self-guided training"), ``key`` its enabling config key.
    """
    if saved is None:
        raise ValueError(f"{where} was saved without {method}; this run has {key}=true ({mine}). "
                         f"Resume it with {key}=false or start a new run directory")  # fmt: skip
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, this run {v!r}" for k, v in mine.items() if saved.get(k) != v]
    if diffs:
        raise ValueError(f"{where} was saved under another {method} plan:\n  " + "\n  ".join(diffs))


def load_checkpoint(path: str | Path, *, model: list, optimizer=None, scheduler=None) -> RestoredState:
    """Collective: load ``path`` into ``model`` (and ``optimizer``/``scheduler`` when given) in place.

    Without an optimizer only the weights are read, which works from any
    layout to any other (evaluation, or starting a new run from trained
    weights).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.utils import unwrap_model

    path = Path(path)
    header = read_checkpoint_header(path)
    if optimizer is not None and header.get("weights_only"):
        raise ValueError(
            f"{path} holds weights only (no optimizer state to resume, e.g. an imported model); start a run in "
            f"another run_dir with checkpoint.load={path}"
        )
    check_module_markers(path, model)
    restore_rng = optimizer is not None and _same_rank_layout(header["layout"])
    model_state = sharded_model_state(model)
    request: dict[str, Any] = {"model": model_state}
    if optimizer is not None:
        request["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=True, metadata=_OPTIMIZER_METADATA)
    if restore_rng:
        request["rng"] = _rng_object(capture_rng_state())
    loaded = dist_checkpointing.load(request, str(path))
    unwrap_model(model[0]).load_state_dict(loaded["model"], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(loaded["scheduler"])
    if restore_rng:
        restore_rng_state(loaded["rng"])
    return RestoredState(
        path=path,
        progress=TrainProgress.from_state_dict(loaded["progress"]),
        data_state=loaded.get("data"),
        layout=header["layout"],
        rng_restored=restore_rng,
    )
