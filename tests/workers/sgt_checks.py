"""Self-guided training across real processes (gloo), run by ``tests/test_sgt_mp.py``.

Two kinds of checks:

* the tensor-parallel guide of every structure and strategy (the TP structured
  FFN cases of ``tests/workers/tp_structured.py``): TP=2 equals TP=1 with
  guides at several α (outputs, input gradients, every weight and gradient,
  the guides included), α = 1 is the dense MLP of the gathered guides, α = 0
  is the structured MLP;
* the trainer's guide controller on a tiny GPT through megatron's schedules,
  DDP and optimizer: TP=2 x DP=1 reproduces TP=1 x DP=2 step by step through
  the guided phase and past the switch-off, every rank of a layer draws the
  same decisions (which are the counter-based draws), and after the switch-off
  no guide parameter, gradient buffer or optimizer state is left.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_sffn.parallel.layout import TPLayout, shard_ranges
from megatron_sffn.structured.guided import drawn_alpha
from tests.workers.tp_structured import (
    CASES,
    _init,
    _relative_error,
    _tp_group,
    build_mlp,
    full_tensor_slice,
    inputs,
    run_mlp,
)

GUIDED_CASES = [case for case in CASES if case.structure != "dense"]
ALPHAS = (1.0, 0.35)


def _set_alpha(mlp, alpha: float) -> None:
    mlp.linear_fc1.guide_alpha = mlp.linear_fc2.guide_alpha = alpha


def _gather_full(param: torch.Tensor, group) -> torch.Tensor:
    """The full tensor of a TP-sharded parameter (megatron's TP attributes say how it is split)."""
    if not getattr(param, "tensor_model_parallel", False) or group.size() == 1:
        return param.detach()
    parts = [torch.empty_like(param) for _ in range(group.size())]
    dist.all_gather(parts, param.detach().contiguous(), group=group)
    axis, stride = param.partition_dim, param.partition_stride
    total = param.shape[axis] * group.size()
    full = torch.empty(*param.shape[:axis], total, *param.shape[axis + 1 :], dtype=param.dtype)
    for rank, part in enumerate(parts):
        offset = 0
        for piece in shard_ranges(total, TPLayout(rank, group.size()), stride):
            width = piece.stop - piece.start
            full.narrow(axis, piece.start, width).copy_(part.narrow(axis, offset, width))
            offset += width
    return full


def _dense_mlp(mlp, x: torch.Tensor, group) -> torch.Tensor:
    """The MLP's output computed with plain dense products of its gathered guides and biases."""
    fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
    hidden = x @ _gather_full(fc1.guide, group).T + _gather_full(fc1.bias, group)
    if fc1.shape.gated:
        gate, value = hidden.chunk(2, dim=-1)
        hidden = F.silu(gate) * value
    else:
        hidden = F.gelu(hidden, approximate="tanh")
    return hidden @ _gather_full(fc2.guide, group).T + fc2.bias


def _output(mlp, x: torch.Tensor) -> torch.Tensor:
    out, bias = mlp(x)
    return out + bias


def guided_mlp_tp2_matches_tp1() -> dict[str, dict[str, float]]:
    """Per case: relative errors of TP=2 against TP=1 with guides, and of α = 1 / α = 0 against references."""
    from megatron_sffn.parallel.grads import average_token_split_grads

    _init(2)
    singles = [dist.new_group([r]) for r in range(dist.get_world_size())]
    single, group = singles[dist.get_rank()], _tp_group()
    layout = TPLayout(group.rank(), group.size())
    x, target = inputs((5, 3))
    results = {}
    for case in GUIDED_CASES:
        errors: dict[str, float] = {}
        reference, parallel = build_mlp(case, single), build_mlp(case, None)
        with torch.no_grad():
            structured_out = _output(parallel, x)
        for mlp in (reference, parallel):
            mlp.linear_fc1.attach_guide()
            mlp.linear_fc2.attach_guide()
        for name in ("linear_fc1.guide", "linear_fc2.guide"):
            mine, full = parallel.get_parameter(name), reference.get_parameter(name)
            errors[f"init:{name}"] = _relative_error(mine.detach(), full_tensor_slice(mine, full.detach(), layout))
        for alpha in ALPHAS:
            _set_alpha(reference, alpha)
            _set_alpha(parallel, alpha)
            y1, loss1, dx1 = run_mlp(reference, x, target)
            y2, loss2, dx2 = run_mlp(parallel, x, target)
            average_token_split_grads([parallel], group)
            errors.update(
                {
                    f"{alpha}:output": _relative_error(y2, y1),
                    f"{alpha}:loss": _relative_error(loss2, loss1),
                    f"{alpha}:input_grad": _relative_error(dx2, dx1),
                }
            )
            full = dict(reference.named_parameters())
            for name, param in parallel.named_parameters():
                errors[f"{alpha}:grad:{name}"] = _relative_error(
                    param.grad, full_tensor_slice(param, full[name].grad, layout)
                )
            if alpha == 1.0:
                with torch.no_grad():
                    errors["alpha1:dense_mlp"] = _relative_error(y2, _dense_mlp(parallel, x, group))
            reference.zero_grad()
            parallel.zero_grad()
        _set_alpha(parallel, 0.0)
        with torch.no_grad():
            errors["alpha0:structured"] = (_output(parallel, x) - structured_out).abs().max().item()
        results[case.name] = errors
    return results


# -- the controller on a tiny GPT ---------------------------------------------------------

STEPS, GUIDED_STEPS = 6, 3
MICRO_BATCHES, MICRO_BATCH_SIZE = 4, 2  # global micro-batches, split over data-parallel ranks
SEQ, VOCAB = 16, 128


def _train_config(tp: int, pp: int, structure: dict[str, Any]):
    from megatron_sffn.config.loading import from_dict
    from megatron_sffn.config.train import TrainConfig

    return from_dict(
        TrainConfig,
        {
            "run_dir": "unused",
            "data": {"path": "unused"},
            "model": {
                "hidden_size": 64,
                "num_layers": 4,
                "num_attention_heads": 4,
                "vocab_size": VOCAB,
                "seq_length": SEQ,
                "ffn": structure,
            },
            "training": {
                "micro_batch_size": MICRO_BATCH_SIZE,
                "global_batch_size": MICRO_BATCHES * MICRO_BATCH_SIZE,
                "train_steps": STEPS,
                "seed": 5,
            },
            "optimizer": {"lr": 3e-3, "warmup_steps": 1},
            "parallel": {"tensor_parallel": tp, "pipeline_parallel": pp},
        },
    )


def _global_batches(step: int) -> list[dict[str, Any]]:
    from megatron_sffn.data.batches import make_batch

    generator = torch.Generator().manual_seed(1000 + step)  # learnable: t[i+1] = t[i] + stride (mod vocab)
    start = torch.randint(0, VOCAB, (MICRO_BATCHES * MICRO_BATCH_SIZE, 1), generator=generator)
    stride = torch.randint(1, 4, (MICRO_BATCHES * MICRO_BATCH_SIZE, 1), generator=generator)
    samples = (start + stride * torch.arange(SEQ + 1)) % VOCAB
    return [make_batch(chunk, torch.ones(len(chunk), dtype=torch.bool)) for chunk in samples.split(MICRO_BATCH_SIZE)]


def _record_forward_alphas(guidance, log: list) -> list:
    """Hooks recording the mixing weight each guided linear actually used in each forward."""
    handles = []
    for slot in guidance.slots:

        def hook(module, args, key=slot.key):
            log.append((key, module.guide_alpha if module.guide is not None else 0.0))

        handles.append(slot.linear.register_forward_pre_hook(hook))
    return handles


def _train(tp: int, pp: int, structure: dict[str, Any]) -> dict[str, Any]:
    from megatron.core import parallel_state

    from megatron_sffn.model import initialize_model_parallel, seed_model_parallel
    from megatron_sffn.training.model_setup import (
        Numerics,
        build_model,
        build_optimizer,
        install_schedule_hooks,
        wrap_data_parallel,
    )
    from megatron_sffn.training.schedule import build_lr_scheduler
    from megatron_sffn.training.self_guided import GuidancePlan, SelfGuidance
    from megatron_sffn.training.step import make_forward_step, reduce_step_numbers, run_schedule

    config = _train_config(tp, pp, structure)
    initialize_model_parallel(tp, pp)
    seed_model_parallel(config.training.seed)
    numerics = Numerics(bf16=False, distributed_optimizer=False)
    model = [wrap_data_parallel(build_model(config, numerics), numerics)]
    install_schedule_hooks(model)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    local = MICRO_BATCHES // dp_size
    guidance = SelfGuidance(
        GuidancePlan(GUIDED_STEPS, seed=config.training.seed),
        model,
        build_optimizer(config, numerics, model),
        micro_batches=local,
        dp_rank=dp_rank,
    )
    guidance.attach()
    scheduler = guidance.bind_scheduler(build_lr_scheduler(guidance.optimizer, config.optimizer, STEPS, 1))
    guide_refs = [weakref.ref(slot.linear.guide) for slot in guidance.slots]
    log: list = []
    handles = _record_forward_alphas(guidance, log)
    losses, used = [], []
    for step in range(1, STEPS + 1):
        guidance.begin_step(step)
        scheduler.step(increment=1)
        for chunk in model:
            chunk.zero_grad_buffer()
        guidance.optimizer.zero_grad()
        batches = _global_batches(step)[dp_rank * local : (dp_rank + 1) * local]
        log.clear()
        forward_step = make_forward_step(before_micro_batch=guidance.before_micro_batch)
        local_loss = run_schedule(
            model, batches, forward_step, seq_length=SEQ, micro_batch_size=MICRO_BATCH_SIZE, forward_only=False
        )
        loss_sum, count = reduce_step_numbers(local_loss, [])
        guidance.optimizer.step()
        losses.append(loss_sum / count)
        used.append(list(log))
        guidance.end_step(step)  # the switch-off rebinds the scheduler
    for handle in handles:
        handle.remove()
    gc.collect()
    return {
        "losses": losses,
        "used": used,
        "dp_rank": dp_rank,
        "guide_params_left": [n for c in model for n, _ in c.named_parameters() if "guide" in n],
        "guides_alive": sum(ref() is not None for ref in guide_refs),
        "slots": len(guidance.slots),
        "scheduler_drives_the_model_optimizer": scheduler.optimizer is guidance.optimizer is guidance.model_optimizer,
        "optimizer_params": sum(p.numel() for g in guidance.optimizer.param_groups for p in g["params"]),
        "model_params": sum(p.numel() for c in model for p in c.parameters()),
        "optimizer_state_params_outside_model": _state_params_outside(guidance.optimizer, model),
        "grad_buffer_elements": sum(b.grad_data.numel() for c in model for b in c.buffers),
        "finalize_is_plain": model[0].config.finalize_model_grads_func.__name__ == "finalize_model_grads",
        "guide_state_keys": [k for k in model[0].module.sharded_state_dict() if "guide" in k],
        "expected_used": [
            [
                drawn_alpha(guidance.plan.alpha_for_update(step), 5, step, dp_rank * local + mb, key)
                for mb in range(local)
                for key in sorted({s.key for s in guidance.slots})
            ]
            for step in range(1, STEPS + 1)
        ],
    }


def _state_params_outside(optimizer, model: list) -> int:
    """Parameters that hold optimizer state (moments) but are not parameters of the model."""
    mine = {id(p) for chunk in model for p in chunk.parameters()}
    return sum(id(p) not in mine for sub in optimizer.chained_optimizers for p in sub.optimizer.state)


def guided_training_tp2_matches_tp1(structure: dict[str, Any]) -> dict[str, Any]:
    """The same guided run at TP=1 x DP=2 and TP=2 x DP=1, and what each rank saw of the other ranks' draws."""
    results = {}
    for tp in (1, 2):
        result = _train(tp, 1, structure)
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, result["used"])
        result["used_by_rank"] = everyone
        results[f"tp{tp}"] = result
    return results


def guided_training_pp2_matches_dp2(structure: dict[str, Any]) -> dict[str, Any]:
    """The same guided run at DP=2 and PP=2; ``structure`` may leave the first stage without any guide."""
    return {"dp2": _train(1, 1, structure), "pp2": _train(1, 2, structure)}
