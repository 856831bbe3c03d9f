"""The model, its data-parallel wrapper and its optimizer, configured for one run.

Everything is megatron-core's own machinery, wired the way Megatron-LM wires
it, because each piece silently depends on the others:

* megatron's ``DistributedDataParallel`` accumulates gradients in contiguous
  buffers (``param.main_grad``), which only megatron's optimizer reads;
* ``finalize_model_grads`` (set as the schedules' finalize hook) performs the
  data-parallel reduction *and* the all-reduce of the tied embedding's
  gradient between the first and last pipeline stage; without it the two
  copies of the embedding drift apart;
* the loss is normalised per token over the whole global batch
  (``calculate_per_token_loss``): the schedule reports (loss sum, token
  count) per micro-batch and ``finalize_model_grads`` divides the gradients
  by the global token count, so masked rows (a skipped bad shard) weigh
  nothing and any TP x PP x DP layout computes the same update;
* bf16 runs keep bf16 weights in the model (``Float16Module``) and fp32
  master weights plus moments in the optimizer; fp32 runs (the CPU default)
  use the plain optimizer.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from ..config.train import TrainConfig
from ..model import build_gpt_model, transformer_config


def fused_adam_available() -> bool:
    """Transformer Engine's or Apex's fused Adam is importable.

    megatron's distributed optimizer can only save checkpoints with one of
    them; on its torch-AdamW fallback every checkpoint format fails.
    """
    return any(importlib.util.find_spec(name) is not None for name in ("transformer_engine", "apex"))


def check_optimizer_choice(config: TrainConfig) -> None:
    """An explicitly requested distributed optimizer that could never checkpoint fails before set-up."""
    if config.parallel.use_distributed_optimizer and not fused_adam_available():
        raise ValueError(
            "parallel.use_distributed_optimizer=true needs Transformer Engine or Apex (their fused Adam): "
            "without them megatron cannot save the distributed optimizer's checkpoints; "
            "set it to null (auto) or false"
        )


@dataclass(frozen=True)
class Numerics:
    """Precision and optimizer flavour resolved for the machine the run is on."""

    bf16: bool
    distributed_optimizer: bool

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32

    @classmethod
    def resolve(cls, config: TrainConfig, on_gpu: bool) -> "Numerics":
        """``auto`` picks the distributed optimizer on GPUs that can checkpoint it."""
        bf16 = config.training.resolved_precision(on_gpu) == "bf16"
        distributed = config.parallel.resolved_distributed_optimizer(on_gpu)
        if config.parallel.use_distributed_optimizer is None:
            distributed = distributed and fused_adam_available()
        return cls(bf16=bf16, distributed_optimizer=distributed)


def build_model(config: TrainConfig, numerics: Numerics):
    """This rank's GPT stage in the run's precision and recomputation settings (not yet DDP-wrapped).

    With ``est.enabled`` its layers can run a drawn subnetwork (same parameters).
    """
    from megatron.core.transformer.module import Float16Module

    training = config.training
    tconfig = transformer_config(
        config.model,
        params_dtype=numerics.params_dtype,
        bf16=numerics.bf16,
        calculate_per_token_loss=True,
        recompute_granularity=training.recompute_granularity,
        recompute_method=training.recompute_method,
        recompute_num_layers=training.recompute_num_layers,
    )
    model = build_gpt_model(config.model, config=tconfig, subnetworks=config.est.enabled)
    if numerics.bf16:
        model = Float16Module(tconfig, model)
    return model


def wrap_data_parallel(model, numerics: Numerics):
    """megatron's DDP around ``model``, with replicas made identical from data-parallel rank 0."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.utils import get_model_config

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=numerics.distributed_optimizer,
    )
    wrapped = DistributedDataParallel(config=get_model_config(model), ddp_config=ddp_config, module=model)
    wrapped.broadcast_params()
    return wrapped


def build_optimizer(config: TrainConfig, numerics: Numerics, model_chunks: list):
    """megatron's AdamW over ``model_chunks`` (biases and norm weights exempt from weight decay)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    opt = config.optimizer
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=opt.lr,
        min_lr=opt.lr * opt.min_lr_ratio,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1,
        adam_beta2=opt.adam_beta2,
        adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad,
        bf16=numerics.bf16,
        params_dtype=numerics.params_dtype,
        use_distributed_optimizer=numerics.distributed_optimizer,
    )
    return get_megatron_optimizer(opt_config, model_chunks)


def install_schedule_hooks(model_chunks: list) -> None:
    """Let megatron's schedules drive gradient synchronisation (see the module docstring)."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.utils import get_model_config

    config = get_model_config(model_chunks[0])
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model_chunks[0].no_sync
