"""Evolving subnetwork training on a built GPT, run by ``tests/test_est.py`` in a worker process.

* a sampled step (sliced weights, smaller products) equals a masked
  reference written here from the method's definition: the full model with
  the dropped heads' attention outputs and the dropped hidden units zeroed
  before the output projections, the kept ones multiplied by 1/p, and a
  skipped layer's output replaced by its input;
* with every rate at 1 the subnetwork-capable model is the baseline model,
  bit for bit (outputs and gradients);
* AdamW on parameters outside a step's subnetwork: a zero gradient, so their
  moments decay and weight decay and the remaining momentum still move them.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_sffn.config.est import ESTConfig, ESTStage1
from megatron_sffn.est import build_plan
from megatron_sffn.model import build_gpt_model, initialize_model_parallel, seed_model_parallel, transformer_config
from tests.workers.model_parallel import tiny_config

SEED = 1234
RATES = ESTStage1(p_L=0.5, p_H=0.5, p_M=0.5)


def _tokens(cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length + 1), generator=gen)
    positions = torch.arange(cfg.seq_length).expand(2, -1)
    return tokens[:, :-1], positions, tokens[:, 1:]


def _loss_and_grads(model, cfg) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    tokens, positions, labels = _tokens(cfg)
    loss = model(tokens, positions, attention_mask=None, labels=labels).float().mean()
    loss.backward()
    grads = {
        n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone() for n, p in model.named_parameters()
    }
    return loss.item(), grads


def _mask_hooks(model, draws, cfg) -> list:
    """The masked reference: full computation, dropped units zeroed, kept ones scaled by 1/p."""
    hooks = []
    head_dim = cfg.kv_channels
    for layer, draw in zip(model.decoder.layers, draws):
        if not draw.active:

            def passthrough(module, args, kwargs, output):
                return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0], output[1]

            hooks.append(layer.register_forward_hook(passthrough, with_kwargs=True))
            continue
        if draw.heads is not None:
            mask = torch.zeros(cfg.num_attention_heads)
            mask[draw.heads.indices()] = 1.0 / draw.p_H
            column_mask = mask.repeat_interleave(head_dim)
            hooks.append(
                layer.self_attention.linear_proj.register_forward_pre_hook(
                    lambda module, args, m=column_mask: (args[0] * m,)
                )
            )
        if draw.hidden is not None:
            mask = torch.zeros(cfg.ffn_hidden_size)
            mask[draw.hidden.indices()] = 1.0 / draw.p_M
            hooks.append(layer.mlp.linear_fc2.register_forward_pre_hook(lambda module, args, m=mask: (args[0] * m,)))
    return hooks


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def masked_reference(cases: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per case: loss and gradient errors of the sliced step against the masked reference on one draw."""
    out = {}
    for name, spec in cases.items():
        spec = dict(spec)
        cfg = tiny_config(spec.pop("structure"), **spec)
        initialize_model_parallel(1, 1)
        seed_model_parallel(SEED)
        model = build_gpt_model(cfg, subnetworks=True)
        plan = build_plan(cfg, ESTConfig(enabled=True, stage1=RATES), total_steps=10, seed=5)
        draws = plan.draw(1)  # with GQA, one kept layer reads only one of its two key/value groups
        for layer, draw in zip(model.decoder.layers, draws):
            layer.select(draw)
        loss, grads = _loss_and_grads(model, cfg)
        for layer in model.decoder.layers:
            layer.select(None)
        hooks = _mask_hooks(model, draws, cfg)
        ref_loss, ref_grads = _loss_and_grads(model, cfg)
        for hook in hooks:
            hook.remove()
        skipped = [d.layer for d in draws if not d.active]
        dropped_rows_zero = all(
            grads[f"decoder.layers.{d.layer}.mlp.linear_fc2.weight"].abs().sum().item() == 0.0
            for d in draws
            if not d.active and f"decoder.layers.{d.layer}.mlp.linear_fc2.weight" in grads
        )
        out[name] = {
            "loss": loss,
            "ref_loss": ref_loss,
            "grad_error": max(_relative(grads[k], ref_grads[k]) for k in grads if ref_grads[k].abs().max() > 0),
            "zero_grads_agree": all(bool((grads[k] == 0).all()) == bool((ref_grads[k] == 0).all()) for k in grads),
            "skipped": skipped,
            "kv_groups": [d.kv_groups(cfg.num_attention_heads // cfg.num_query_groups) for d in draws if d.active],
            "skipped_layer_grads_zero": dropped_rows_zero,
        }
    return out


def full_rates_equal_baseline(structures: list[str]) -> dict[str, bool]:
    """A subnetwork-capable model given a full-model draw (stage 3) computes what the plain model computes."""
    out = {}
    for structure in structures:
        cfg = tiny_config(structure)
        results = []
        for subnetworks in (False, True):
            initialize_model_parallel(1, 1)
            seed_model_parallel(SEED)
            model = build_gpt_model(cfg, subnetworks=subnetworks)
            if subnetworks:
                plan = build_plan(cfg, ESTConfig(enabled=True, stage_ends=[0.0, 0.0]), total_steps=4, seed=5)
                for layer, draw in zip(model.decoder.layers, plan.draw(1)):
                    layer.select(draw)
            results.append(_loss_and_grads(model, cfg))
        (loss_a, grads_a), (loss_b, grads_b) = results
        out[structure] = loss_a == loss_b and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    return out


def adamw_outside_subnetwork(lr: float = 1e-2, weight_decay: float = 0.1) -> dict[str, Any]:
    """Two AdamW steps (full, then a draw): parameters outside the second step's subnetwork, step by step."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    cfg = tiny_config("lowrank")
    initialize_model_parallel(1, 1)
    seed_model_parallel(SEED)
    config = transformer_config(cfg)
    model = DistributedDataParallel(
        config=config,
        module=build_gpt_model(cfg, config=config, subnetworks=True),
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=lr, weight_decay=weight_decay, adam_beta1=0.9, adam_beta2=0.95, clip_grad=0.0
        ),
        [model],
    )
    layers = model.module.decoder.layers
    plan = build_plan(cfg, ESTConfig(enabled=True, stage1=RATES), total_steps=10, seed=5)
    draws = plan.draw(1)
    skipped = next(d.layer for d in draws if not d.active)
    kept = next(d for d in draws if d.active)
    watched = {
        "skipped_layer_qkv": layers[skipped].self_attention.linear_qkv.weight,
        "dropped_hidden_u": layers[kept.layer].mlp.linear_fc1.u,
    }
    dropped_units = torch.tensor(sorted(set(range(cfg.ffn_hidden_size)) - set(kept.hidden.indices().tolist())))
    tokens, positions, labels = _tokens(cfg)
    history = []
    for step_draws in (None, draws):
        for layer, draw in zip(layers, step_draws or [None] * len(layers)):
            layer.select(draw)
        model.zero_grad_buffer()
        optimizer.zero_grad()
        model(tokens, positions, attention_mask=None, labels=labels).float().mean().backward()
        finalize_model_grads([model])
        before = {k: p.detach().clone() for k, p in watched.items()}
        grads = {k: p.main_grad.detach().clone() for k, p in watched.items()}
        optimizer.step()
        state = {
            k: {m: optimizer.optimizer.state[p][m].clone() for m in ("exp_avg", "exp_avg_sq")}
            for k, p in watched.items()
        }
        history.append(
            {
                "before": before,
                "grad": grads,
                "after": {k: p.detach().clone() for k, p in watched.items()},
                "state": state,
            }
        )
    rows = {"skipped_layer_qkv": slice(None), "dropped_hidden_u": dropped_units}
    errors = {}
    for key, index in rows.items():
        first, second = history[0], history[1]
        grad = second["grad"][key][index]
        m = 0.9 * first["state"][key]["exp_avg"][index]
        v = 0.95 * first["state"][key]["exp_avg_sq"][index]
        w = second["before"][key][index]
        expected = w * (1 - lr * weight_decay) - lr * (m / (1 - 0.9**2)) / ((v / (1 - 0.95**2)).sqrt() + 1e-8)
        errors[key] = {
            "grad_max": grad.abs().max().item(),
            "exp_avg_error": (second["state"][key]["exp_avg"][index] - m).abs().max().item(),
            "exp_avg_sq_error": (second["state"][key]["exp_avg_sq"][index] - v).abs().max().item(),
            "update_error": (second["after"][key][index] - expected).abs().max().item(),
            "moved": (second["after"][key][index] - w).abs().max().item(),
        }
    return errors
