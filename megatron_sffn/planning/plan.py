"""Plan a run without running it: the layout, memory per stage and expected speed of a config at a world size.

A 64-GPU job that cannot split its model, does not fit in memory or would
take a month should be found out on the login node in a second, not after
the queue wait.  Nothing here allocates a tensor on a device or starts a
process group: the plan is arithmetic on the resolved configuration (the
memory model is in :mod:`.memory`, the device figures in :mod:`.devices`).

Throughput is ``MFU × peak FLOP/s × processes / training FLOPs per token``,
with the structured FLOP count of "Building on Efficient Foundations" (Wei et
al., NeurIPS 2024), the same numerator the trainer's MFU uses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..accounting.model import (
    ForwardFlops,
    ParameterCount,
    count_parameters,
    forward_flops_per_token,
    training_flops_per_token,
)
from ..config.loading import to_dict
from ..config.train import TrainConfig
from .checks import check_run_config
from .devices import Device, resolve_device
from .memory import (
    StageMemory,
    bytes_per_element,
    format_gib,
    in_flight_micro_batches,
    output_and_loss_bytes,
    stage_activation_bytes,
    stage_layers,
    stage_params_per_rank,
    static_bytes_per_param,
)
from .steps import resolved_train_steps

DEFAULT_ASSUMED_MFU = 0.4
TIGHT_MEMORY_FRACTION = 0.9


@dataclass(frozen=True)
class Layout:
    world_size: int
    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    micro_batch_size: int
    micro_batches: int  # per replica per step: the gradient-accumulation steps
    global_batch_size: int
    seq_length: int
    tokens_per_step: int
    train_steps: int

    @property
    def train_tokens(self) -> int:
        return self.tokens_per_step * self.train_steps


@dataclass(frozen=True)
class Throughput:
    assumed_mfu: float
    training_flops_per_token: float
    tokens_per_second: float
    seconds_per_step: float
    run_seconds: float


@dataclass
class RunPlan:
    """Everything the dry run reports; ``problems`` non-empty means the launch would fail."""

    config: TrainConfig
    layout: Layout
    device: Device
    precision: str
    distributed_optimizer: bool
    parameters: ParameterCount
    forward_flops: ForwardFlops
    stages: list[StageMemory]
    throughput: Throughput | None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def peak_stage(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total)

    def to_dict(self) -> dict:
        data = {f.name: to_dict(getattr(self, f.name)) for f in dataclasses.fields(self)}
        data["stages"] = [{**to_dict(s), "activations": s.activations, "total": s.total} for s in self.stages]
        data["parameters"]["total"] = self.parameters.total
        data["forward_flops"]["total"] = self.forward_flops.total
        data["layout"]["train_tokens"] = self.layout.train_tokens
        return data


def plan_layout(cfg: TrainConfig, world_size: int) -> Layout:
    """The TP x PP x DP split and batch arithmetic; raises ValueError naming the key that does not divide."""
    check_run_config(cfg)
    cfg.validate_layout(world_size)
    model, training, parallel = cfg.model, cfg.training, cfg.parallel
    if model.vocab_size % parallel.tensor_parallel:
        raise ValueError(
            f"model.vocab_size={model.vocab_size} is not divisible by "
            f"parallel.tensor_parallel={parallel.tensor_parallel}"
        )
    return Layout(
        world_size=world_size,
        tensor_parallel=parallel.tensor_parallel,
        pipeline_parallel=parallel.pipeline_parallel,
        data_parallel=cfg.data_parallel_size(world_size),
        micro_batch_size=training.micro_batch_size,
        micro_batches=cfg.num_micro_batches(world_size),
        global_batch_size=training.global_batch_size,
        seq_length=model.seq_length,
        tokens_per_step=cfg.tokens_per_step(),
        train_steps=resolved_train_steps(cfg),
    )


def plan_memory(cfg: TrainConfig, layout: Layout, bf16: bool, distributed_optimizer: bool) -> list[StageMemory]:
    """Per-stage memory of one process (every TP and DP rank of a stage holds the same amount)."""
    training = cfg.training
    e = bytes_per_element(bf16)
    w, g, o = static_bytes_per_param(bf16, distributed_optimizer, layout.data_parallel)
    stages = []
    for stage in range(layout.pipeline_parallel):
        params = stage_params_per_rank(cfg.model, layout.tensor_parallel, layout.pipeline_parallel, stage)
        layers = stage_layers(cfg.model.num_layers, layout.pipeline_parallel, stage)
        configured = stage_activation_bytes(
            cfg, stage, e, training.recompute_granularity, training.recompute_method, training.recompute_num_layers
        )
        last = stage == layout.pipeline_parallel - 1
        stages.append(
            StageMemory(
                stage=stage,
                first_layer=layers.start,
                last_layer=layers.stop - 1,
                params=params,
                weights=int(params * w),
                gradients=int(params * g),
                optimizer=int(params * o),
                activations_per_micro_batch=configured,
                activations_no_recompute=stage_activation_bytes(cfg, stage, e, None),
                activations_full_recompute=stage_activation_bytes(cfg, stage, e, "full", "uniform", 1),
                in_flight=in_flight_micro_batches(layout.pipeline_parallel, stage, layout.micro_batches),
                output_and_loss=output_and_loss_bytes(cfg, e) if last else 0,
            )
        )
    return stages


def plan_throughput(cfg: TrainConfig, layout: Layout, device: Device, assumed_mfu: float) -> Throughput | None:
    if device.peak_flops is None:
        return None
    flops = training_flops_per_token(cfg.model)
    tokens_per_second = assumed_mfu * device.peak_flops * layout.world_size / flops
    step = layout.tokens_per_step / tokens_per_second
    return Throughput(assumed_mfu, flops, tokens_per_second, step, step * layout.train_steps)


def plan_run(
    cfg: TrainConfig,
    world_size: int,
    *,
    device: str | None = None,
    device_memory_gib: float | None = None,
    assumed_mfu: float = DEFAULT_ASSUMED_MFU,
    processes_per_node: int | None = None,
) -> RunPlan:
    """The structured plan; raises ValueError for a layout that cannot be built at all.

    A plan that can be computed but would not run (memory above the device)
    comes back with ``problems``; :func:`.report.format_plan` states them.
    """
    if not 0 < assumed_mfu <= 1:
        raise ValueError(f"--assume-mfu={assumed_mfu} must be in (0, 1]")
    layout = plan_layout(cfg, world_size)
    precision_on_gpu = cfg.training.resolved_precision(on_gpu=True)
    resolved = resolve_device(
        device,
        precision_on_gpu=precision_on_gpu,
        memory_gib=device_memory_gib,
        peak_tflops=cfg.logging.peak_tflops_per_device,
        processes_per_node=processes_per_node or world_size,
    )
    precision = cfg.training.resolved_precision(on_gpu=resolved.is_gpu)
    distributed_optimizer = cfg.parallel.resolved_distributed_optimizer(on_gpu=resolved.is_gpu)
    stages = plan_memory(cfg, layout, precision == "bf16", distributed_optimizer)
    plan = RunPlan(
        config=cfg,
        layout=layout,
        device=resolved,
        precision=precision,
        distributed_optimizer=distributed_optimizer,
        parameters=count_parameters(cfg.model),
        forward_flops=forward_flops_per_token(cfg.model),
        stages=stages,
        throughput=plan_throughput(cfg, layout, resolved, assumed_mfu),
    )
    _judge_memory(plan)
    if resolved.is_gpu and cfg.parallel.use_distributed_optimizer is None:
        plan.notes.append(
            "parallel.use_distributed_optimizer=auto is planned as on: the trainer turns it on where Transformer "
            "Engine or Apex provides a fused Adam, otherwise off (set it explicitly to plan the other case)"
        )
    if plan.throughput is None:
        plan.notes.append(f"no peak FLOP/s known for {resolved.name!r}: set logging.peak_tflops_per_device")
    return plan


def _judge_memory(plan: RunPlan) -> None:
    capacity = plan.device.memory_bytes
    peak = plan.peak_stage
    if capacity is None:
        plan.notes.append(f"memory of {plan.device.name!r} unknown: pass --device-memory-gib to check the fit")
        return
    where = f"pipeline stage {peak.stage}" if plan.layout.pipeline_parallel > 1 else "each process"
    if peak.total > capacity:
        hints = []
        if plan.config.training.recompute_granularity is None:
            hints.append(f"training.recompute_granularity=full needs {format_gib(_with_full_recompute(peak))}")
        if plan.device.is_gpu and not plan.distributed_optimizer and plan.layout.data_parallel > 1:
            hints.append("parallel.use_distributed_optimizer=true shards the optimizer state")
        hints.append("a smaller training.micro_batch_size or more tensor/pipeline parallelism lower it")
        plan.problems.append(
            f"memory: {where} needs {format_gib(peak.total)}, more than the {format_gib(capacity)} of "
            f"{plan.device.name} ({plan.device.memory_source}); " + "; ".join(hints)
        )
    elif peak.total > TIGHT_MEMORY_FRACTION * capacity:
        plan.notes.append(
            f"memory is tight: {format_gib(peak.total)} of {format_gib(capacity)}; the CUDA context, communication "
            f"buffers and allocator fragmentation need a few GiB on top"
        )


def _with_full_recompute(stage: StageMemory) -> int:
    return stage.total - stage.in_flight * (stage.activations_per_micro_batch - stage.activations_full_recompute)
