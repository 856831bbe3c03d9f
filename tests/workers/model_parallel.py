"""Checks run inside torchrun workers (see ``tests/mp_harness.py``) on the full GPT.

Every layout trains the same tiny model from the same seed on the same global
batch through megatron's own machinery: ``get_forward_backward_func``
schedules, megatron DDP, ``get_megatron_optimizer`` and
``finalize_model_grads`` (the only place the tied-embedding gradient is
reduced between the first and last pipeline stage).  Full tensors are
reassembled from each module's own ``sharded_state_dict`` description, so
the comparison also exercises the sharding metadata the checkpoints rely on.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megatron_sffn.config import ModelConfig
from megatron_sffn.model import build_gpt_model, initialize_model_parallel, seed_model_parallel, transformer_config
from tests.mp_harness import scratch_dir

TINY = dict(hidden_size=64, num_layers=4, num_attention_heads=4, num_query_groups=2, vocab_size=128, seq_length=16)
STRUCTURES = {
    "dense": {},
    "lowrank": {"rank": 16},
    "blockdense": {"rank": 32, "blocks": 4},
    "blockshuffle": {"blocks": 4},
}
MICRO_BATCHES = 8  # global, split over data-parallel ranks
MICRO_BATCH_SIZE = 1
STEPS = 3
SEED = 1234


def tiny_config(structure: str = "dense", **overrides: Any) -> ModelConfig:
    return ModelConfig(**{**TINY, "ffn": {"structure": structure, **STRUCTURES[structure]}, **overrides})


# ---------------------------------------------------------------------------
# building and training


def _data_parallel_reduction_only(model_chunks, *args, **kwargs) -> None:
    """What a loop without ``finalize_model_grads`` does: DP all-reduce, no embedding/TP reductions."""
    for chunk in model_chunks:
        chunk.finish_grad_sync()


def _model_and_optimizer(cfg: ModelConfig, tp: int, pp: int, seed: int, finalize: bool = True):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    initialize_model_parallel(tp, pp)
    seed_model_parallel(seed)
    config = transformer_config(cfg)
    model = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=False),
        module=build_gpt_model(cfg, config=config),
    )
    config.finalize_model_grads_func = finalize_model_grads if finalize else _data_parallel_reduction_only
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=3e-3, weight_decay=0.1, clip_grad=1.0, params_dtype=torch.float32),
        [model],
    )
    return model, optimizer


def _global_batch(cfg: ModelConfig, step: int) -> torch.Tensor:
    """Token sequences of one step, identical on every rank and for every layout."""
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, cfg.vocab_size, (MICRO_BATCHES * MICRO_BATCH_SIZE, cfg.seq_length + 1), generator=gen)


def _local_micro_batches(cfg: ModelConfig, step: int) -> list[torch.Tensor]:
    from megatron.core import parallel_state

    dp = parallel_state.get_data_parallel_world_size()
    mine = _global_batch(cfg, step).split(MICRO_BATCH_SIZE)[parallel_state.get_data_parallel_rank() :: dp]
    return list(mine)


def _positions(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)


def _lm_forward_step(data_iterator, model):
    sequences = next(data_iterator)
    tokens, labels = sequences[:, :-1], sequences[:, 1:]
    per_token = model(tokens, _positions(tokens), None, labels=labels)

    def loss_func(output: torch.Tensor):
        loss = output.float().mean()
        # clone: the schedule divides the returned loss in place by the number of micro-batches
        return loss, {"lm loss": loss.detach().clone()}

    return per_token, loss_func


def _train_step(model, optimizer, cfg: ModelConfig, step: int) -> tuple[float | None, float]:
    """One optimizer step; returns (global mean loss on the last stage else None, grad norm)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model.zero_grad_buffer()
    optimizer.zero_grad()
    micro = _local_micro_batches(cfg, step)
    reduced = get_forward_backward_func()(
        forward_step_func=_lm_forward_step,
        data_iterator=iter(micro),
        model=[model],
        num_microbatches=len(micro),
        seq_length=cfg.seq_length,
        micro_batch_size=MICRO_BATCH_SIZE,
        forward_only=False,
    )
    ok, grad_norm, _ = optimizer.step()
    if not ok:
        raise RuntimeError(f"optimizer step {step} was skipped")
    if not parallel_state.is_pipeline_last_stage():
        return None, float(grad_norm)
    loss = torch.stack([r["lm loss"] for r in reduced]).mean()
    dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
    return loss.item() / parallel_state.get_data_parallel_world_size(), float(grad_norm)


def _train(cfg: ModelConfig, tp: int, pp: int, finalize: bool = True) -> dict[str, Any]:
    """Train ``STEPS`` steps; record losses, grad norms, the first step's full gradients and final weights."""
    model, optimizer = _model_and_optimizer(cfg, tp, pp, SEED, finalize)
    losses, norms = [], []
    grads, grad_dup = None, None
    for step in range(STEPS):
        loss, norm = _train_step(model, optimizer, cfg, step)
        losses.append(loss)
        norms.append(norm)
        if step == 0:
            grads, grad_dup = gather_full_tensors(model, "grad")
    params, param_dup = gather_full_tensors(model, "param")
    return {
        "losses": losses,
        "grad_norms": norms,
        "grads": grads,
        "params": params,
        "grad_replica_mismatch": grad_dup,
        "param_replica_mismatch": param_dup,
    }


# ---------------------------------------------------------------------------
# reassembling full tensors


def gather_full_tensors(model, source: str) -> tuple[dict[str, torch.Tensor], float]:
    """Full (unsharded) parameters or gradients keyed by checkpoint key, on every rank.

    Each rank contributes its shards as its modules describe them in
    ``sharded_state_dict`` (global shape and offset).  For gradients the
    parameters temporarily point at their ``main_grad`` so the same
    description applies.  Returns also the largest disagreement between copies
    of one region held by several ranks (data-parallel replicas,
    tensor-parallel replicated tensors, the tied embedding on the first and
    last pipeline stage), which must be ~0 after ``finalize_model_grads``.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
    from megatron.core.utils import unwrap_model

    if source not in ("param", "grad"):
        raise ValueError(f"source={source!r}; expected 'param' or 'grad'")
    params = list(model.parameters())
    originals = [p.data for p in params]
    if source == "grad":
        for p in params:
            p.data = p.main_grad
    try:
        sharded = unwrap_model(model).sharded_state_dict()
        apply_factories(sharded)
        storages = {p.data.untyped_storage().data_ptr() for p in params}
        local = [
            (t.key, tuple(t.global_shape), tuple(t.global_offset), t.data.detach().clone())
            for t in nested_values(sharded)
            if isinstance(t, ShardedTensor) and t.data.untyped_storage().data_ptr() in storages
        ]
    finally:
        for p, data in zip(params, originals):
            p.data = data
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    full: dict[str, torch.Tensor] = {}
    mismatch = 0.0
    for pieces in everyone:
        for key, shape, offset, data in pieces:
            target = full.setdefault(key, torch.full(shape, float("nan")))
            lead = len(offset) - data.dim()
            region = tuple(offset[:lead]) + tuple(slice(o, o + n) for o, n in zip(offset[lead:], data.shape))
            held = target[region]
            if not torch.isnan(held).any():
                mismatch = max(mismatch, (held - data).abs().max().item())
            target[region] = data
    holes = [key for key, t in full.items() if torch.isnan(t).any()]
    if holes:
        raise AssertionError(f"sharded_state_dict leaves regions of {holes} uncovered")
    return full, mismatch


# ---------------------------------------------------------------------------
# inference through the pipeline


def _logits(model, tokens: torch.Tensor) -> torch.Tensor | None:
    """Full-vocabulary logits on the last pipeline stage (None elsewhere), through megatron's schedule."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    captured: list[torch.Tensor] = []

    def forward_step(data_iterator, chunk):
        batch = next(data_iterator)
        output = chunk(batch, _positions(batch), None)

        def keep(logits: torch.Tensor):
            captured.append(gather_from_tensor_model_parallel_region(logits).detach().clone())
            return logits.sum() * 0, {}

        return output, keep

    model.eval()
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([tokens]),
            model=[model],
            num_microbatches=1,
            seq_length=tokens.shape[1],
            micro_batch_size=tokens.shape[0],
            forward_only=True,
        )
    model.train()
    return captured[0] if parallel_state.is_pipeline_last_stage() else None


# ---------------------------------------------------------------------------
# checks


def reference_training(structures: list[str]) -> dict[str, Any]:
    """TP=1, PP=1, DP=1 runs: the references every layout is compared with."""
    return {structure: _train(tiny_config(structure), 1, 1) for structure in structures}


def layout_training(layouts: list[tuple[str, int, int]]) -> dict[str, Any]:
    """Train ``(structure, tp, pp)`` layouts; the remaining factor of the world is data parallel.

    Full tensors are returned from rank 0 only; losses from every rank that
    holds them (the last pipeline stage).
    """
    out = {}
    for structure, tp, pp in layouts:
        run = _train(tiny_config(structure), tp, pp)
        if dist.get_rank() != 0:
            run = {k: v for k, v in run.items() if k not in ("grads", "params")}
        out[f"{structure}/tp{tp}pp{pp}"] = run
    return out


def control_without_finalize(layout: tuple[str, int, int]) -> dict[str, Any]:
    """A layout trained without ``finalize_model_grads``: shows the comparisons can see that bug."""
    structure, tp, pp = layout
    return _train(tiny_config(structure), tp, pp, finalize=False)


def _checkpoint_dir(name: str):
    path = scratch_dir() / name
    if dist.get_rank() == 0:
        path.mkdir()
    dist.barrier()
    return path


def _save_trained(cfg: ModelConfig, tp: int, pp: int, seed: int, name: str):
    """Train one step (so biases and norms leave their init), save, return logits and the path."""
    from megatron.core import dist_checkpointing
    from megatron.core.utils import unwrap_model

    model, optimizer = _model_and_optimizer(cfg, tp, pp, seed)
    _train_step(model, optimizer, cfg, 0)
    path = _checkpoint_dir(name)
    dist_checkpointing.save(unwrap_model(model).sharded_state_dict(), str(path))
    return _logits(model, probe_tokens(cfg)), path


def _load_fresh(cfg: ModelConfig, tp: int, pp: int, seed: int, path) -> torch.Tensor | None:
    """Build from a different seed, load the checkpoint with strict key matching, return logits."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    initialize_model_parallel(tp, pp)
    seed_model_parallel(seed)
    model = build_gpt_model(cfg)
    state = dist_checkpointing.load(model.sharded_state_dict(), str(path), strict=StrictHandling.RAISE_ALL)
    model.load_state_dict(state)
    return _logits(model, probe_tokens(cfg))


def probe_tokens(cfg: ModelConfig) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, cfg.seq_length), generator=torch.Generator().manual_seed(7))


def checkpoint_reshard(structures: list[str]) -> dict[str, Any]:
    """Save at TP=2 x PP=2 and load at TP=1; save at TP=1 and load at TP=2 (4 ranks).

    The loading model is built from another seed, so identical logits mean
    every tensor came from the checkpoint.
    """
    out = {}
    for structure in structures:
        cfg = tiny_config(structure)
        saved, path = _save_trained(cfg, 2, 2, seed=11, name=f"{structure}-tp2pp2")
        loaded = _load_fresh(cfg, 1, 1, seed=12, path=path)
        out[f"{structure}/tp2pp2->tp1"] = {"saved": saved, "loaded": loaded}
        saved, path = _save_trained(cfg, 1, 1, seed=13, name=f"{structure}-tp1")
        loaded = _load_fresh(cfg, 2, 1, seed=14, path=path)
        out[f"{structure}/tp1->tp2"] = {"saved": saved, "loaded": loaded}
    return out


def build_error(structure: str, tp: int, **sizes: int) -> str:
    """The error raised when a structured model cannot be split over ``tp`` ranks."""
    initialize_model_parallel(tp, 1)
    seed_model_parallel(SEED)
    cfg = ModelConfig(**{**TINY, "ffn": {"structure": structure, **sizes}})
    try:
        build_gpt_model(cfg)
    except ValueError as err:
        return str(err)
    raise AssertionError(f"{structure} {sizes} built at tensor_parallel={tp} without an error")


# ---------------------------------------------------------------------------
# single-process checks (run with nproc=1 so megatron's global state stays out of pytest)


def _describe(model) -> dict[str, Any]:
    """What the single-process tests assert on, as plain data."""
    layers = model.decoder.layers
    dense_weights = {
        "embedding": model.embedding.word_embeddings.weight,
        "layer0.qkv": layers[0].self_attention.linear_qkv.weight,
        "layer0.proj": layers[0].self_attention.linear_proj.weight,
        "layer0.fc1": layers[0].mlp.linear_fc1.weight,
        "layer0.fc2": layers[0].mlp.linear_fc2.weight,
    }
    return {
        "num_params": sum(p.numel() for p in model.parameters()),
        "fc1_classes": [type(layer.mlp.linear_fc1).__name__ for layer in layers],
        "fc2_classes": [type(layer.mlp.linear_fc2).__name__ for layer in layers],
        "std": {name: w.detach().std().item() for name, w in dense_weights.items()},
        "mean": {name: w.detach().mean().item() for name, w in dense_weights.items()},
        "bias_abs_max": max(
            p.detach().abs().max().item() for n, p in model.named_parameters() if n.endswith("bias") and "norm" not in n
        ),
        "norm_weights": sorted(
            {p.detach().unique().tolist()[0] for n, p in model.named_parameters() if "norm.weight" in n}
        ),
        "has_output_weight": model.output_layer.weight is not None,
        "shares_embedding": model.shared_embedding_or_output_weight() is model.embedding.word_embeddings.weight,
        "pre_mlp_norms": [type(layer.pre_mlp_layernorm).__name__ for layer in layers],
        "core_attention": type(layers[0].self_attention.core_attention).__name__,
    }


def model_properties(configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Build each named config (``structure`` plus ModelConfig overrides) at TP=1 and describe it."""
    out = {}
    for name, spec in configs.items():
        spec = dict(spec)
        initialize_model_parallel(1, 1)
        seed_model_parallel(SEED)
        out[name] = _describe(build_gpt_model(tiny_config(spec.pop("structure"), **spec)))
    return out


def core_attention_matches_reference() -> dict[str, float]:
    """SDPA core attention vs. a plain softmax(QKᵀ/√d)V with GQA and megatron's own DotProductAttention."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_sffn.cpu_compat import core_attention_class

    initialize_model_parallel(1, 1)
    seed_model_parallel(SEED)
    cfg = tiny_config()
    config = transformer_config(cfg)
    sq, b, heads, groups, dim = cfg.seq_length, 2, cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(sq, b, heads, dim, generator=gen)
    k = torch.randn(sq, b, groups, dim, generator=gen)
    v = torch.randn(sq, b, groups, dim, generator=gen)
    causal = torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)
    padding = torch.zeros(b, 1, sq, sq, dtype=torch.bool)
    padding[1, ..., -3:] = True  # second sequence: last three keys are padding
    padded_causal = padding | causal

    def reference(mask: torch.Tensor) -> torch.Tensor:
        kk = k.repeat_interleave(heads // groups, dim=2)
        vv = v.repeat_interleave(heads // groups, dim=2)
        scores = torch.einsum("sbhd,tbhd->bhst", q, kk) / dim**0.5
        probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
        return torch.einsum("bhst,tbhd->sbhd", probs, vv).reshape(sq, b, heads * dim)

    sdpa = core_attention_class()(config, 1, AttnMaskType.causal, "self")
    megatron_attention = DotProductAttention(config, 1, AttnMaskType.causal, "self")
    return {
        "causal_vs_reference": (sdpa(q, k, v, None) - reference(causal)).abs().max().item(),
        "masked_vs_reference": (sdpa(q, k, v, padded_causal) - reference(padded_causal)).abs().max().item(),
        "masked_vs_megatron": (sdpa(q, k, v, padded_causal) - megatron_attention(q, k, v, padded_causal))
        .abs()
        .max()
        .item(),
    }


def rng_tracker_behaviour() -> dict[str, Any]:
    """megatron's RNG tracker API on the CPU stand-in: named streams that fork and restore."""
    from megatron.core import tensor_parallel

    initialize_model_parallel(1, 1)
    seed_model_parallel(SEED)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(4)
    restored = torch.equal(before, torch.get_rng_state())
    with tracker.fork():
        second = torch.rand(4)
    seed_model_parallel(SEED)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        replay = torch.rand(4)
    return {
        "restores_outer_state": restored,
        "stream_advances": not torch.equal(first, second),
        "reseed_replays": torch.equal(first, replay),
        "differs_from_default": not torch.equal(first, torch.rand(4)),
        "streams": sorted(tracker.get_states()),
    }
