"""The parts of a run that a checkpoint holds, each saved and restored under its own key.

A run's state is a map ``key -> part``; every part says what it saves
(``state_dict``) and takes that back (``load_state_dict``), so the
checkpointer (:mod:`.checkpointing`) only iterates the map.  Most parts are
small objects identical on every rank (the LR scheduler, the counters, the
data position, the self-guided / evolving subnetwork training plans): saved
once, restored from the checkpoint's common state.  Three are sharded
(:class:`ShardedPart`): the model's weights and the optimizer's state are
global tensors, which reshard to any layout, and the RNG states one object per
global rank; they also say what ``dist_checkpointing`` should fill on load.

Parts are restored in the map's order, the common ones first: a training plan
(``sgt``, ``est``) checks itself against the restored ``progress`` step, and
self-guided training may drop its guides before the model's and optimizer's
tensors are requested.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import torch.distributed as dist

from .rng import capture_rng_state, restore_rng_state
from .state import TrainProgress

# Reshardable across TP, PP and DP; megatron's own default for the distributed optimizer.
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_sharded_model_space"}


class Stateful(Protocol):
    """A part of a run's state: what a checkpoint saves of it, and how it takes that back."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


@runtime_checkable
class ShardedPart(Stateful, Protocol):
    """A part saved as ``dist_checkpointing`` sharded tensors or objects."""

    def sharded_template(self, header: dict[str, Any]) -> Any | None:
        """What to load into (``header``: the checkpoint's common state); None leaves this part as it is."""
        ...


def current_layout() -> dict[str, int]:
    from megatron.core import parallel_state

    return {
        "world_size": dist.get_world_size(),
        "tensor_parallel": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_parallel": parallel_state.get_pipeline_model_parallel_world_size(),
        "data_parallel": parallel_state.get_data_parallel_world_size(),
    }


def same_rank_layout(saved: dict[str, int]) -> bool:
    """Whether global rank r now plays the role rank r had when the checkpoint was saved."""
    now = current_layout()
    return all(saved.get(k) == now[k] for k in ("world_size", "tensor_parallel", "pipeline_parallel"))


def sharded_model_state(model_chunks: list) -> dict[str, Any]:
    from megatron.core.utils import unwrap_model

    if len(model_chunks) != 1:
        raise ValueError(f"expected one model chunk per rank (no virtual pipeline stages), got {len(model_chunks)}")
    return unwrap_model(model_chunks[0]).sharded_state_dict()


@dataclass
class ModelWeights:
    """``model``: every parameter as a global tensor with its sharding recorded."""

    model_chunks: list

    def state_dict(self) -> dict[str, Any]:
        return sharded_model_state(self.model_chunks)

    def sharded_template(self, header: dict[str, Any]) -> dict[str, Any]:
        return sharded_model_state(self.model_chunks)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from megatron.core.utils import unwrap_model

        unwrap_model(self.model_chunks[0]).load_state_dict(state, strict=True)


@dataclass
class OptimizerState:
    """``optimizer``: moments (and fp32 master weights) keyed to the model's global tensors.

    ``optimizer`` is asked for the optimizer each time: self-guided training
    replaces it when the guides are dropped, which may happen while the
    checkpoint's earlier parts are restored.
    """

    optimizer: Callable[[], Any]
    model_chunks: list

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer().sharded_state_dict(sharded_model_state(self.model_chunks), metadata=_OPTIMIZER_METADATA)

    def sharded_template(self, header: dict[str, Any]) -> dict[str, Any]:
        return self.optimizer().sharded_state_dict(
            sharded_model_state(self.model_chunks), is_loading=True, metadata=_OPTIMIZER_METADATA
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer().load_state_dict(state)


@dataclass
class RankRNG:
    """``rng``: this rank's generator states, restored only when rank r keeps its role (``restored`` says whether)."""

    restored: bool = field(default=False, init=False)

    def state_dict(self):
        return _rng_object(capture_rng_state())

    def sharded_template(self, header: dict[str, Any]):
        return _rng_object(capture_rng_state()) if same_rank_layout(header["layout"]) else None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_rng_state(state)
        self.restored = True


def _rng_object(state: Any):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject("rng_state", state, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


class TrainingPlan(Protocol):
    """A training regime whose plan a run must resume under (self-guided or evolving subnetwork training)."""

    def checkpoint_state(self, completed_steps: int) -> dict[str, Any] | None: ...

    def prepare_resume(self, saved: dict[str, Any] | None, completed_steps: int, where: str) -> None: ...


@dataclass
class PlanState:
    """``sgt`` / ``est``: a training plan at the run's step; restoring it checks it (``where`` names the checkpoint)."""

    plan: TrainingPlan
    progress: TrainProgress
    where: str

    def state_dict(self) -> dict[str, Any] | None:
        return self.plan.checkpoint_state(self.progress.step)

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.plan.prepare_resume(state, self.progress.step, self.where)
