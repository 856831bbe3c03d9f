"""Plan a run without running it: layout, cost, memory and time of a config at a world size.

    python -m megatron_sffn.training.dry_run CONFIG.yaml [dotted.key=value ...] --world-size 64 --device H100

A 64-GPU job that cannot split its model, does not fit in memory or would
take a month should be found out on the login node in a second, not after
the queue wait.  Nothing here allocates a tensor on a device or starts a
process group: the plan is arithmetic on the resolved configuration.

Memory model (per process, bytes; the worst pipeline stage decides)
-------------------------------------------------------------------
Static, per parameter held by the rank (its TP shard of its PP stage):

=========== ======================== =====================================
            bf16 (GPU default)        fp32 (CPU default)
=========== ======================== =====================================
weights     2                         4
gradients   4 (fp32 reduce buffer)    4
optimizer   12 / DP* (fp32 master     8 / DP* (Adam moments)
            copy + Adam moments)
=========== ======================== =====================================

(*) divided by the data-parallel size only with the distributed optimizer.
This is megatron-core's layout as the trainer configures it
(``grad_reduce_in_fp32``, ``Float16Module``, megatron's optimizers).

Activations are what autograd keeps for the backward pass, counted tensor by
tensor for this architecture (pre-LN, RoPE, fused-softmax-free attention, no
dropout), per token of a micro-batch and per layer, with ``e`` bytes per
element (2 in bf16, 4 in fp32), ``t`` the TP size and no sequence
parallelism (so norm inputs and outputs are replicated over TP):

* ``4·h·e``: both norms' inputs and outputs (outputs are the next linear's saved input);
* ``(2·d_attn + 2·d_kv)/t·e``: q, k (after RoPE), v and the attention output kept by
  ``scaled_dot_product_attention``, plus ``d_attn/t·e`` for the output projection's
  input and ``heads/t·4`` for the softmax log-sum-exp;
* ``(fc1_out + f)/t·e``: the FFN activation's input and output;
* structured FFNs add their inner features, one vector per linear: the rank R for
  LowRank and BlockDense (gathered over TP); for BlockShuffle the whole middle
  vector d of fc1 (its rows of every group read all of it; ``split/reduce``
  also keeps its d/t input slice) and fc2's d/t slice;
* 16 bytes of fp32 norm statistics.

A SUPRA layer ("Linearizing Large Language Models", Mercat et al., 2024)
keeps instead of the softmax attention's tensors: the feature maps' inputs,
all-gathered over TP (``(d_attn + d_kv)·e``), the ReLU outputs
(``(d_attn + d_kv)/t·e``), fp32 q, k, v after RoPE and the GQA
repeat (``3·d_attn/t·4``), the chunk's score matrices (``2·C·heads/t·4``),
the chunk states amortised per token (``2·heads·d_head²/(C·t)·4``), the fp32
outputs before and after GroupNorm and the projection input.  Selective
recomputation does not apply to it.

The last stage adds the final norm, the fp32 logits that the cross entropy
keeps (``V/t·4``, plus the ``V/t·e`` copy that bf16 casts through) and, at
the start of the backward pass, the output layer's weight gradient and input
gradient.  Recomputation: ``selective`` drops the attention output and
log-sum-exp (megatron recomputes core attention); ``full`` keeps one input
per checkpointed chunk and rematerialises one chunk at a time.  With
pipeline parallelism, stage ``s`` of ``p`` holds ``min(p - s, micro-batches)``
micro-batches in flight (1F1B schedule).

The estimate is of allocated tensor bytes, the quantity
``torch.cuda.max_memory_allocated`` reports; the CUDA context, NCCL buffers and
allocator fragmentation come on top, which is why a plan above 90% of the
device is flagged.

Throughput is ``MFU × peak FLOP/s × processes / training FLOPs per token``,
with the structured FLOP count of "Building on Efficient Foundations" (Wei et
al., NeurIPS 2024), the same numerator the trainer's MFU uses.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Sequence

from ..accounting.model import (
    ForwardFlops,
    ParameterCount,
    count_parameters,
    ffn_layer_kinds,
    forward_flops_per_token,
    supra_feature_map_widths,
    training_flops_per_token,
)
from ..config.loading import load_config, to_dict
from ..config.model import ModelConfig
from ..config.train import TrainConfig
from ..entry_setup import quiet_known_warnings
from ..structured import counts
from .devices import find_device, known_device_names

DEFAULT_ASSUMED_MFU = 0.4
TIGHT_MEMORY_FRACTION = 0.9
_GIB = 1024**3
_FP32 = 4

# -- the plan's parts ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    """What one process runs on: its name, peak FLOP/s and memory, each with where the figure comes from."""

    name: str
    is_gpu: bool
    peak_flops: float | None
    peak_source: str
    memory_bytes: int | None
    memory_source: str


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
class StageMemory:
    """Bytes one process of pipeline stage ``stage`` holds at its peak."""

    stage: int
    first_layer: int
    last_layer: int
    params: int  # parameters on one rank of this stage
    weights: int
    gradients: int
    optimizer: int
    activations_per_micro_batch: int  # with the configured recomputation
    activations_no_recompute: int
    activations_full_recompute: int
    in_flight: int
    output_and_loss: int  # final norm, logits and the backward's first gradients (last stage)

    @property
    def activations(self) -> int:
        return self.in_flight * self.activations_per_micro_batch + self.output_and_loss

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations


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


# -- device ----------------------------------------------------------------------------------------


def detect_gpu() -> tuple[str, int] | None:
    """(name, memory bytes) of this machine's first GPU from ``nvidia-smi``, which does not initialise CUDA here."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    first = out.strip().splitlines()[0] if out.strip() else ""
    name, _, mib = first.rpartition(",")
    try:
        return name.strip(), int(float(mib)) * 1024**2
    except ValueError:
        return None


def resolve_device(
    name: str | None,
    *,
    precision_on_gpu: str,
    memory_gib: float | None = None,
    peak_tflops: float | None = None,
    processes_per_node: int = 1,
) -> Device:
    """The device a plan is for: ``name`` ("cpu" or a GPU name), else this machine's GPU, else its CPU.

    The peak comes from ``peak_tflops`` (``logging.peak_tflops_per_device``),
    the datasheet table of :mod:`.metrics`, or on CPU a short matmul
    measurement; memory from ``memory_gib``, ``nvidia-smi``, the table above,
    or on CPU the machine's RAM shared by the processes of one node.
    """
    from .metrics import lookup_gpu_peak, measure_cpu_matmul_peak

    detected = detect_gpu() if name is None else None
    if name is None:
        name = detected[0] if detected else "cpu"
    if name.lower() == "cpu":
        import psutil
        import torch

        if peak_tflops is not None:
            peak, peak_source = peak_tflops * 1e12, "logging.peak_tflops_per_device"
        else:
            peak = measure_cpu_matmul_peak()
            peak_source = f"measured fp32 matmul peak of this process ({torch.get_num_threads()} threads)"
        if memory_gib is not None:
            memory, memory_source = int(memory_gib * _GIB), "--device-memory-gib"
        else:
            memory = psutil.virtual_memory().total // max(processes_per_node, 1)
            memory_source = f"this machine's RAM / {max(processes_per_node, 1)} process(es) per node"
        return Device("CPU", False, peak, peak_source, memory, memory_source)

    spec = find_device(name)
    if spec is None and detected is None and (peak_tflops is None or memory_gib is None):
        raise ValueError(
            f"--device {name!r} is not a device this planner knows; known: {', '.join(known_device_names())} "
            f"(or plan an unlisted device by giving both --device-memory-gib and logging.peak_tflops_per_device)"
        )
    if peak_tflops is not None:
        peak, peak_source = peak_tflops * 1e12, "logging.peak_tflops_per_device"
    else:
        found = lookup_gpu_peak(name, precision_on_gpu)
        peak, peak_source = (found.flops_per_second, found.source) if found else (None, "unknown device")
    if memory_gib is not None:
        memory, memory_source = int(memory_gib * _GIB), "--device-memory-gib"
    elif detected is not None:
        memory, memory_source = detected[1], "nvidia-smi"
    else:
        memory, memory_source = int(spec.memory_gib * _GIB), "datasheet"
    return Device(name, True, peak, peak_source, memory, memory_source)


# -- layout and parameters per rank ---------------------------------------------------------------


def plan_layout(cfg: TrainConfig, world_size: int) -> Layout:
    """The TP x PP x DP split and batch arithmetic; raises ValueError naming the key that does not divide."""
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
        train_steps=cfg.resolved_train_steps(),
    )


def _ffn_params_per_rank(model: ModelConfig, kind: str, tp: int) -> int:
    """FFN weights and biases one TP rank holds; structured factors follow the TP plan the modules use
    (``model.ffn.tp_strategy``, whose divisibility :class:`TrainConfig` has already checked)."""
    d = model.hidden_size
    (_, fc1_out), _ = model.ffn_shapes()
    if tp == 1:  # every factor whole; spares importing the TP modules (and megatron) for a one-rank plan
        weights = sum(counts.weight_params(kind, n, m, model.ffn.rank, model.ffn.blocks) for n, m in model.ffn_shapes())
        return weights + fc1_out + d
    from ..parallel.plan import rank_cost

    strategy = None if kind == "dense" else _tp_strategy(model, kind, tp)
    return rank_cost(_ffn_shape(model, kind), strategy, tp).params


def _ffn_shape(model: ModelConfig, kind: str):
    from ..parallel.plan import FFNShape

    return FFNShape(kind, model.hidden_size, model.ffn_hidden_size, model.ffn.rank, model.ffn.blocks,
                    gated=model.activation == "swiglu")  # fmt: skip


def _tp_strategy(model: ModelConfig, kind: str, tp: int):
    """The structured FFN's TP plan as the modules choose it (``model.ffn.tp_strategy`` or the automatic one)."""
    from ..parallel.plan import choose_strategy

    return choose_strategy(_ffn_shape(model, kind), tp, model.ffn.tp_strategy)


def _layer_params_per_rank(model: ModelConfig, layer: int, tp: int) -> int:
    """One decoder layer's parameters on one TP rank (norms and row-parallel biases are replicated;
    SUPRA's feature maps are column-parallel)."""
    d = model.hidden_size
    qkv = model.attention_width + 2 * model.kv_width
    attention = (d * qkv + qkv) // tp + model.attention_width * d // tp + d
    if model.is_linear_attention(layer):
        attention += sum(w * w + w for w in supra_feature_map_widths(model)) // tp
    return 2 * 2 * d + attention + _ffn_params_per_rank(model, ffn_layer_kinds(model)[layer], tp)


def stage_layers(num_layers: int, pp: int, stage: int) -> range:
    per_stage = num_layers // pp
    return range(stage * per_stage, (stage + 1) * per_stage)


def stage_params_per_rank(model: ModelConfig, tp: int, pp: int, stage: int) -> int:
    """Parameters on one rank of ``stage``: its layers, plus the embedding (first) and output side (last).

    With pipeline parallelism a tied output layer is a second copy of the
    embedding on the last stage (megatron keeps the two in sync by reducing
    their gradients), so it counts there too.
    """
    d, vocab = model.hidden_size, model.vocab_size
    params = sum(_layer_params_per_rank(model, i, tp) for i in stage_layers(model.num_layers, pp, stage))
    if stage == 0:
        params += vocab * d // tp
    if stage == pp - 1:
        params += 2 * d
        if not model.tie_embeddings or pp > 1:
            params += vocab * d // tp
    return params


# -- activations ------------------------------------------------------------------------------------


def _structured_inner_features(model: ModelConfig, kind: str, tp: int) -> int:
    """Inner features per token that a structured FFN's two linears keep for the backward pass."""
    if kind in ("lowrank", "blockdense"):
        return 2 * model.ffn.rank
    if kind == "blockshuffle":
        (fc1_in, fc1_out), (fc2_in, fc2_out) = model.ffn_shapes()
        inner = min(fc1_in, fc1_out) + min(fc2_in, fc2_out) // tp
        if tp > 1 and _tp_strategy(model, kind, tp).fc1_in == "split":
            inner += fc1_in // tp
        return inner
    return 0


def _supra_attention_bytes_per_token(model: ModelConfig, tp: int, element_bytes: int) -> int:
    """What a SUPRA layer's attention keeps per token (see the module docstring); it has no selective recompute."""
    e, heads, width = element_bytes, model.num_attention_heads // tp, model.attention_width // tp
    chunk = min(model.supra.chunk_size, model.seq_length)
    qk = model.attention_width + model.kv_width
    kept = qk * e + qk // tp * e  # the feature maps' all-gathered inputs, their ReLU outputs
    kept += 3 * width * _FP32 + 2 * chunk * heads * _FP32  # fp32 q, k, v; intra-chunk scores
    kept += 2 * heads * model.kv_channels**2 // chunk * _FP32  # chunk states, amortised over the chunk
    return kept + 2 * width * _FP32 + width * e  # pre- and post-GroupNorm outputs, projection input


def layer_activation_bytes_per_token(model: ModelConfig, layer: int, tp: int, element_bytes: int,
                                     selective_recompute: bool = False) -> int:
    """Bytes one decoder layer keeps per token for the backward pass (see the module docstring)."""
    d, e = model.hidden_size, element_bytes
    (_, fc1_out), _ = model.ffn_shapes()
    kind = ffn_layer_kinds(model)[layer]
    norms = 4 * d * e + 2 * 2 * _FP32
    if model.is_linear_attention(layer):
        attention = _supra_attention_bytes_per_token(model, tp, e)
    else:
        attention = (2 * model.attention_width + 2 * model.kv_width) // tp * e + model.attention_width // tp * e
        attention += model.num_attention_heads // tp * _FP32
        if selective_recompute:
            attention -= model.attention_width // tp * e + model.num_attention_heads // tp * _FP32
    ffn = (fc1_out + model.ffn_hidden_size) // tp * e + _structured_inner_features(model, kind, tp) * e
    return norms + attention + ffn


def stage_activation_bytes(cfg: TrainConfig, stage: int, element_bytes: int, recompute: str | None,
                           method: str | None = None, recompute_layers: int | None = None) -> int:
    """Activations of one micro-batch on one rank of ``stage`` under a recomputation setting."""
    model, tp, pp = cfg.model, cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel
    tokens = cfg.training.micro_batch_size * model.seq_length
    layers = stage_layers(model.num_layers, pp, stage)
    selective = recompute == "selective"
    per_layer = [layer_activation_bytes_per_token(model, i, tp, element_bytes, selective) for i in layers]
    if recompute != "full":
        return tokens * sum(per_layer)
    checkpoint_input = model.hidden_size * element_bytes
    if method == "block":  # the first N layers keep only their input, the others everything
        n = min(recompute_layers, len(per_layer))
        kept = n * checkpoint_input + sum(per_layer[n:])
        return tokens * max(kept, n * checkpoint_input + max(per_layer))
    chunks = math.ceil(len(per_layer) / recompute_layers)  # uniform: one input per chunk, one chunk rebuilt
    rebuilt = max(sum(per_layer[i:i + recompute_layers]) for i in range(0, len(per_layer), recompute_layers))
    return tokens * (chunks * checkpoint_input + rebuilt)


def output_and_loss_bytes(cfg: TrainConfig, element_bytes: int) -> int:
    """Last stage: final norm and fp32 logits kept by the loss, then the output layer's first gradients."""
    model, tp = cfg.model, cfg.parallel.tensor_parallel
    tokens = cfg.training.micro_batch_size * model.seq_length
    d, vocab_shard = model.hidden_size, model.vocab_size // tp
    cast_copy = element_bytes if element_bytes != _FP32 else 0
    kept = tokens * (2 * d * element_bytes + 2 * _FP32 + vocab_shard * (_FP32 + cast_copy))
    first_gradients = vocab_shard * d * element_bytes + tokens * d * element_bytes
    return kept + first_gradients


def in_flight_micro_batches(pp: int, stage: int, micro_batches: int) -> int:
    """Micro-batches whose activations stage ``stage`` holds at once under 1F1B (one without pipelining)."""
    return 1 if pp == 1 else min(pp - stage, micro_batches)


# -- the plan ---------------------------------------------------------------------------------------


def _static_bytes_per_param(bf16: bool, distributed_optimizer: bool, dp: int) -> tuple[float, float, float]:
    weights = 2 if bf16 else _FP32
    optimizer = (12 if bf16 else 8) / (dp if distributed_optimizer else 1)
    return weights, _FP32, optimizer


def plan_memory(cfg: TrainConfig, layout: Layout, bf16: bool, distributed_optimizer: bool) -> list[StageMemory]:
    """Per-stage memory of one process (every TP and DP rank of a stage holds the same amount)."""
    training = cfg.training
    e = 2 if bf16 else _FP32
    w, g, o = _static_bytes_per_param(bf16, distributed_optimizer, layout.data_parallel)
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
    comes back with ``problems``; :func:`dry_run_report` states them.
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
            hints.append(f"training.recompute_granularity=full needs {_gib(_with_full_recompute(peak))}")
        if plan.device.is_gpu and not plan.distributed_optimizer and plan.layout.data_parallel > 1:
            hints.append("parallel.use_distributed_optimizer=true shards the optimizer state")
        hints.append("a smaller training.micro_batch_size or more tensor/pipeline parallelism lower it")
        plan.problems.append(
            f"memory: {where} needs {_gib(peak.total)}, more than the {_gib(capacity)} of {plan.device.name} "
            f"({plan.device.memory_source}); " + "; ".join(hints)
        )
    elif peak.total > TIGHT_MEMORY_FRACTION * capacity:
        plan.notes.append(
            f"memory is tight: {_gib(peak.total)} of {_gib(capacity)}; the CUDA context, communication buffers and "
            f"allocator fragmentation need a few GiB on top"
        )


def _with_full_recompute(stage: StageMemory) -> int:
    return stage.total - stage.in_flight * (stage.activations_per_micro_batch - stage.activations_full_recompute)


# -- the report -------------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / _GIB:.2f} GiB" if n >= 0.1 * _GIB else f"{n / 1024**2:.1f} MiB"


def _count(n: float) -> str:
    for threshold, suffix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= threshold:
            return f"{n / threshold:.3g}{suffix}"
    return f"{n:.3g}"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _recompute_label(cfg: TrainConfig) -> str:
    t = cfg.training
    if t.recompute_granularity is None:
        return "none"
    if t.recompute_granularity == "selective":
        return "selective (core attention)"
    return f"full, {t.recompute_method}, {t.recompute_num_layers} layer(s)"


def format_plan(plan: RunPlan) -> str:
    """The human-readable report of a plan."""
    import yaml

    cfg, lay, dev = plan.config, plan.layout, plan.device
    model, p, f = cfg.model, plan.parameters, plan.forward_flops
    lines = [f"Dry run at world size {lay.world_size}: nothing allocated on a device, no process group started.", ""]
    lines.append("Resolved config")
    lines += ["  " + line for line in yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip().splitlines()]
    lines += [
        "",
        "Parallel layout",
        f"  TP {lay.tensor_parallel} x PP {lay.pipeline_parallel} x DP {lay.data_parallel} = "
        f"{lay.world_size} processes",
        f"  micro-batch {lay.micro_batch_size} x {lay.seq_length} tokens; {lay.micro_batches} micro-batch(es) per "
        f"replica per step (gradient accumulation steps: {lay.micro_batches})",
        f"  global batch {lay.global_batch_size} sequences = {lay.tokens_per_step:,} tokens per step; "
        f"{lay.train_steps:,} steps = {lay.train_tokens:,} tokens",
        "",
        f"Parameters: {p.total:,} ({_count(p.total)})",
        f"  embedding {p.embedding:,} | attention {p.attention:,} | norms {p.layernorm:,} | FFN weights "
        f"{p.ffn_weights:,} | FFN biases {p.ffn_biases:,} | output layer {p.output_layer:,}",
        f"  FFN structure: {model.ffn.structure}"
        + (f" (rank {model.ffn.rank})" if model.ffn.rank else "")
        + (f" (blocks {model.ffn.blocks})" if model.ffn.blocks else "")
        + (f", dense layers {model.ffn.dense_layers}" if model.ffn.structure != "dense" else ""),
        "",
        "FLOPs per token (Wei et al., NeurIPS 2024):",
        "  2·L·(2·d_attn·d + 2·d_kv·d + 2·seq·d_attn) + 2·(FFN weight params) + 2·V·d",
        f"  forward: attention projections {_count(f.attention_projections)} + attention scores "
        f"{_count(f.attention_scores)} + FFN {_count(f.ffn)} + logits {_count(f.logits)} = {_count(f.total)}",
        f"  training (3 x forward): {_count(3 * f.total)} per token, "
        f"{_count(3 * f.total * lay.train_tokens)} for the run",
        "",
        f"Memory per process on {dev.name} ({plan.precision}, "
        f"{'distributed' if plan.distributed_optimizer else 'plain'} optimizer, recompute: {_recompute_label(cfg)})",
        f"  {'stage':>5} {'layers':>7} {'params':>8} {'weights':>10} {'grads':>10} {'optimizer':>10} "
        f"{'activations':>22} {'total':>10}",
    ]
    for s in plan.stages:
        acts = f"{s.in_flight} x {_gib(s.activations_per_micro_batch)}"
        if s.output_and_loss:
            acts += f" + {_gib(s.output_and_loss)}"
        lines.append(
            f"  {s.stage:>5} {f'{s.first_layer}-{s.last_layer}':>7} {_count(s.params):>8} {_gib(s.weights):>10} "
            f"{_gib(s.gradients):>10} {_gib(s.optimizer):>10} {acts:>22} {_gib(s.total):>10}"
        )
    peak = plan.peak_stage
    lines.append(
        f"  activations per micro-batch (stage {peak.stage}): no recompute {_gib(peak.activations_no_recompute)}, "
        f"full recompute {_gib(peak.activations_full_recompute)}, configured {_gib(peak.activations_per_micro_batch)}; "
        f"last stage output and loss {_gib(plan.stages[-1].output_and_loss)}"
    )
    capacity = _gib(dev.memory_bytes) if dev.memory_bytes is not None else "unknown"
    lines.append(f"  peak {_gib(peak.total)} of {capacity} ({dev.memory_source})")
    lines.append("")
    if plan.throughput is not None:
        t = plan.throughput
        lines += [
            f"Expected speed at an assumed MFU of {100 * t.assumed_mfu:.0f}% of {dev.peak_flops / 1e12:.4g} TFLOP/s "
            f"per device ({dev.peak_source})",
            f"  {_count(t.tokens_per_second)} tokens/s ({_count(t.tokens_per_second / lay.world_size)} per device), "
            f"{_duration(t.seconds_per_step)} per step, {_duration(t.run_seconds)} for {lay.train_steps:,} steps "
            f"(evaluation and checkpoints not included)",
        ]
    for note in plan.notes:
        lines.append(f"note: {note}")
    if plan.problems:
        lines.append("REFUSED: this launch would fail")
        lines += [f"  - {problem}" for problem in plan.problems]
    else:
        lines.append("OK: the layout splits and fits")
    return "\n".join(lines)


def dry_run_report(cfg: TrainConfig, world_size: int, **options) -> str:
    """Plan ``cfg`` at ``world_size`` processes and return the report (options as for :func:`plan_run`)."""
    return format_plan(plan_run(cfg, world_size, **options))


# -- command line -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_sffn.training.dry_run",
        description="Print the layout, cost, memory and expected time of a run without starting it.",
    )
    parser.add_argument("config", help="run configuration (YAML)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, as for training")
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")),
                        help="processes of the launch (default: $WORLD_SIZE or 1)")
    parser.add_argument("--nproc-per-node", type=int, default=None,
                        help="processes sharing one machine's RAM in a CPU plan (default: the world size)")
    parser.add_argument("--device", default=None,
                        help="'cpu' or a GPU name such as 'H100 SXM' or 'A100-SXM4-40GB' "
                             "(default: this machine's GPU from nvidia-smi, else its CPU)")
    parser.add_argument("--device-memory-gib", type=float, default=None,
                        help="memory of one device, overriding nvidia-smi and the table")
    parser.add_argument("--assume-mfu", type=float, default=DEFAULT_ASSUMED_MFU,
                        help=f"model FLOPs utilisation to expect (default {DEFAULT_ASSUMED_MFU})")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of the report")
    return parser.parse_intermixed_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0 for a plan that fits, 2 for a refused launch (reasons on stderr)."""
    quiet_known_warnings()
    args = parse_args(argv)
    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
        plan = plan_run(
            cfg,
            args.world_size,
            device=args.device,
            device_memory_gib=args.device_memory_gib,
            assumed_mfu=args.assume_mfu,
            processes_per_node=args.nproc_per_node,
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: refused: {exc}", file=sys.stderr, flush=True)
        return 2
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan), flush=True)
    for problem in plan.problems:
        print(f"error: refused: {problem}", file=sys.stderr, flush=True)
    return 2 if plan.problems else 0


if __name__ == "__main__":
    sys.exit(main())
