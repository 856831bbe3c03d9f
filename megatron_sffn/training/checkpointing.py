"""Save and restore the complete training state with megatron's ``dist_checkpointing``.

A checkpoint directory (see :mod:`.checkpoint_dirs` for how it becomes
visible atomically) holds the parts of a run's state (:mod:`.checkpoint_parts`),
each under its key, in megatron's ``torch_dist`` format:

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

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import torch.distributed as dist
import yaml

from ..config.loading import from_dict, save_config, to_dict
from ..config.model import ModelConfig
from ..config.train import DebugConfig, TrainConfig
from .checkpoint_dirs import LATEST_FILE, CheckpointDirs, step_dir_name
from .checkpoint_parts import ModelWeights, ShardedPart, Stateful, current_layout, sharded_model_state
from .schedule import LRSchedule
from .state import TrainProgress

CHECKPOINT_FORMAT = "megatron-sffn/checkpoint-v1"
CONFIG_FILE = "config.yaml"
CHECKPOINTS_SUBDIR = "checkpoints"  # inside a run directory


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


def save_run_config(config: TrainConfig, path: Path) -> None:
    """Write the resolved config, its ``debug`` section at the defaults: faults and traces belong to one launch,
    so a relaunch from a saved config injects and records nothing."""
    save_config(dataclasses.replace(config, debug=DebugConfig()), path)


def write_checkpoint(
    dirs: CheckpointDirs,
    state: Mapping[str, Stateful],
    *,
    step: int,
    config: TrainConfig,
    lr_schedule: LRSchedule | None = None,
) -> Path:
    """Collective: write every part of ``state`` under its key into the uncommitted directory of ``step``.

    ``lr_schedule``: the schedule the run follows (default: the config's).
    Returns that directory; :func:`commit_checkpoint` makes it visible.
    """
    partial = _write(dirs, step, {key: part.state_dict() for key, part in state.items()})
    if dist.get_rank() == 0:
        save_run_config(config, partial / CONFIG_FILE)
        (lr_schedule or LRSchedule.of(config)).write(partial)
    return partial


def commit_checkpoint(dirs: CheckpointDirs, step: int, *, keep_last: int | None) -> Path:
    """Collective: make the written checkpoint of ``step`` the latest, keeping the newest ``keep_last``."""
    dist.barrier()
    if dist.get_rank() == 0:
        dirs.commit(step)
        dirs.prune(keep_last)
    dist.barrier()
    return dirs.root / step_dir_name(step)


def _write(dirs: CheckpointDirs, step: int, objects: dict[str, Any]) -> Path:
    """Collective: ``objects`` and the format header into the uncommitted directory of ``step``; returns it."""
    from megatron.core import dist_checkpointing

    if dist.get_rank() == 0:
        dirs.begin(step)
    dist.barrier()
    partial = dirs.partial_path(step)
    header = {"format": CHECKPOINT_FORMAT, "layout": current_layout()}
    dist_checkpointing.save({**header, **objects}, str(partial), sharded_strategy=_save_strategy())
    return partial


def save_weights_checkpoint(dirs: CheckpointDirs, *, config: TrainConfig, model: list) -> Path:
    """Collective: a checkpoint of the weights alone at step 0 (no optimizer, schedule, data or RNG state).

    What an imported model becomes: :func:`load_checkpoint` reads it at any
    layout (evaluation, generation, or a new run's ``checkpoint.load``);
    resuming a run from it is not possible (there is no optimizer state to
    resume).
    """
    progress = TrainProgress()
    objects = {
        "model": sharded_model_state(model),
        "progress": progress.state_dict(),
        "data": None,
        "sgt": None,
        "weights_only": True,
    }
    partial = _write(dirs, progress.step, objects)
    if dist.get_rank() == 0:
        save_config(config, partial / CONFIG_FILE)
    return commit_checkpoint(dirs, progress.step, keep_last=None)


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
        raise ValueError(
            f"{where} was saved without {method}; this run has {key}=true ({mine}). "
            f"Resume it with {key}=false or start a new run directory"
        )
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, this run {v!r}" for k, v in mine.items() if saved.get(k) != v]
    if diffs:
        raise ValueError(f"{where} was saved under another {method} plan:\n  " + "\n  ".join(diffs))


def restore_checkpoint(path: str | Path, state: Mapping[str, Stateful]) -> dict[str, Any]:
    """Collective: restore every part of ``state`` from the checkpoint ``path``, in the map's order.

    The small common parts come first, before any tensor is read, so that a
    part refusing the checkpoint (another training plan) fails early and
    self-guided training can drop guides the checkpoint no longer has; then
    the sharded parts are loaded in one read.  Returns the checkpoint's common
    state (its ``layout``, ``progress``, ...).
    """
    from megatron.core import dist_checkpointing

    path = Path(path)
    header = read_checkpoint_header(path)
    if header.get("weights_only") and set(state) - {"model"}:
        raise ValueError(
            f"{path} holds weights only (no optimizer state to resume, e.g. an imported model); start a run in "
            f"another run_dir with checkpoint.load={path}"
        )
    sharded = {key: part for key, part in state.items() if isinstance(part, ShardedPart)}
    for key, part in state.items():
        if key not in sharded:
            part.load_state_dict(header.get(key))
    model = state.get("model")
    if isinstance(model, ModelWeights):
        check_module_markers(path, model.model_chunks)
    templates = {key: part.sharded_template(header) for key, part in sharded.items()}
    request = {key: template for key, template in templates.items() if template is not None}
    loaded = dist_checkpointing.load(request, str(path))
    for key in request:
        sharded[key].load_state_dict(loaded[key])
    return header


def load_checkpoint(path: str | Path, *, model: list) -> dict[str, Any]:
    """Collective: the weights of ``path`` into ``model``, in place, from any layout (evaluation, a new run's start).

    Returns the checkpoint's common state.
    """
    return restore_checkpoint(path, {"model": ModelWeights(model)})
