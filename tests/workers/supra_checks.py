"""SUPRA checks run inside torchrun workers (see ``tests/mp_harness.py``).

The references are written here from the paper's equations, independently of
``megatron_sffn.linear_attention``: explicit q/k/v splits of megatron's fused
projection, explicit feature maps, rotate-half RoPE with float64 angles, the
ALiBi slopes written out, the naive quadratic decayed attention and an
explicit GroupNorm, all in float64.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from megatron_sffn.config import ModelConfig
from megatron_sffn.model import (
    build_gpt_model,
    initialize_model_parallel,
    seed_model_parallel,
)

SEED = 4321
# Slopes s_h of the decays exp(-s_h), written out: 4 heads (2^(-8/4))^(h+1), and 6 heads by the ALiBi
# fallback (the 4-head slopes, then every other slope of 8 heads).
SLOPES = {4: [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8], 6: [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]}
MODELS = {
    "gqa": dict(hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2),
    "mha": dict(hidden_size=32, num_layers=2, num_attention_heads=4),
    "six_heads": dict(hidden_size=48, num_layers=2, num_attention_heads=6, num_query_groups=3),
}


def model_config(name: str, **supra: Any) -> ModelConfig:
    return ModelConfig(
        **MODELS[name], vocab_size=64, seq_length=32, attention="supra", supra={"chunk_size": 4, **supra}
    )


def _build(cfg: ModelConfig):
    initialize_model_parallel(1, 1)
    seed_model_parallel(SEED)
    model = build_gpt_model(cfg)
    model.eval()
    return model


def _rope(t: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate-half RoPE of t [s, heads, d], positions 0..s-1, float64 angles."""
    s, _, d = t.shape
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(s, dtype=torch.float64)[:, None] * inv[None, :]
    angles = torch.cat([angles, angles], dim=-1)[:, None, :]
    half = torch.cat([-t[..., d // 2 :], t[..., : d // 2]], dim=-1)
    return t * angles.cos() + half * angles.sin()


def _reference_attention(cfg: ModelConfig, params: dict[str, torch.Tensor], x: torch.Tensor):
    """SUPRA attention of x [s, h] (batch 1) from the layer's weights: (pre-GroupNorm [s, H, d], output [s, h])."""
    p = {k: v.double() for k, v in params.items()}
    x = x.double()
    heads, groups, d = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    per_group = heads // groups
    qkv = (x @ p["linear_qkv.weight"].T + p["linear_qkv.bias"]).view(-1, groups, (per_group + 2) * d)
    q = qkv[..., : per_group * d].reshape(-1, heads * d)
    k = qkv[..., per_group * d : (per_group + 1) * d].reshape(-1, groups * d)
    v = qkv[..., (per_group + 1) * d :].reshape(-1, groups, d)
    q = torch.relu(q @ p["feature_map.weight"].T + p["feature_map.bias"]).view(-1, heads, d)
    fk = "feature_map_k" if groups < heads else "feature_map"
    k = torch.relu(k @ p[f"{fk}.weight"].T + p[f"{fk}.bias"]).view(-1, groups, d)
    k, v = (t[:, torch.arange(heads) // per_group] for t in (k, v))
    q, k = _rope(q, cfg.rope_base), _rope(k, cfg.rope_base) / math.sqrt(d)
    s = x.shape[0]
    lag = torch.arange(s)[:, None] - torch.arange(s)[None, :]
    gamma = torch.exp(-torch.tensor(SLOPES[heads], dtype=torch.float64))
    decay = torch.where(lag >= 0, gamma[:, None, None] ** lag.clamp(min=0), 0.0)  # [H, s, s]
    scores = torch.einsum("ihd,jhd->hij", q, k) * decay
    pre_norm = torch.einsum("hij,jhd->ihd", scores, v)
    mean = pre_norm.mean(-1, keepdim=True)
    var = pre_norm.var(-1, unbiased=False, keepdim=True)
    normed = ((pre_norm - mean) / torch.sqrt(var + 1e-5)).reshape(s, heads * d)
    return pre_norm, normed @ p["linear_proj.weight"].T + p["linear_proj.bias"]


def attention_matches_reference(names: list[str], length: int = 11) -> dict[str, dict[str, float]]:
    """Each model's layer-0 SUPRA attention against the float64 reference: max errors (pre-GroupNorm, output)."""
    results = {}
    for name in names:
        cfg = model_config(name)
        model = _build(cfg)
        attention = model.decoder.layers[0].self_attention
        captured = []
        hook = attention.head_norm.register_forward_hook(lambda mod, args, out, keep=captured: keep.append(args[0]))
        x = torch.randn(length, 1, cfg.hidden_size, generator=torch.Generator().manual_seed(7))
        freqs = model.rotary_pos_emb(length)
        with torch.no_grad():
            out, bias = attention(x, None, rotary_pos_emb=freqs)
        hook.remove()
        params = {k: v for k, v in attention.state_dict().items() if not k.endswith("_extra_state")}
        pre_ref, out_ref = _reference_attention(cfg, params, x[:, 0])
        pre = captured[0][0].permute(1, 0, 2)  # [heads, s, d] -> [s, heads, d]
        results[name] = {
            "pre_norm": (pre.double() - pre_ref).abs().max().item(),
            "pre_norm_scale": pre_ref.abs().max().item(),
            "output": ((out + bias)[:, 0].double() - out_ref).abs().max().item(),
            "new_weights": sorted(attention.new_parameter_names()),
        }
    return results


def _full_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None)


def greedy_decode_matches_full_forward(models: dict[str, dict[str, Any]], new_tokens: int = 6) -> dict[str, Any]:
    """Greedy decoding through megatron's StaticInferenceContext vs the full-sequence forward of its output."""
    from megatron.core.inference.contexts import StaticInferenceContext

    results = {}
    for label, spec in models.items():
        cfg = model_config(spec["model"], **spec.get("supra", {}))
        model = _build(cfg)
        prompt = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
        context = StaticInferenceContext(max_batch_size=2, max_sequence_length=cfg.seq_length)
        tokens, step_logits, feed = prompt, [], prompt
        with torch.no_grad():
            for _ in range(new_tokens):
                offset = context.sequence_len_offset
                positions = torch.arange(offset, offset + feed.shape[1]).expand_as(feed)
                logits = model(feed, positions, None, inference_context=context, runtime_gather_output=True)[:, -1]
                context.sequence_len_offset += feed.shape[1]
                if offset == 0:
                    context.enable_decode_mode()
                step_logits.append(logits)
                feed = logits.argmax(-1, keepdim=True)
                tokens = torch.cat([tokens, feed], dim=1)
        full = _full_logits(model, tokens)[:, prompt.shape[1] - 1 : -1]
        states = {
            number: (tuple(m.shape) if torch.is_tensor(m) else "kv-cache")
            for number, m in context.key_value_memory_dict.items()
        }
        results[label] = {
            "max_error": (torch.stack(step_logits, dim=1) - full).abs().max().item(),
            "scale": full.abs().max().item(),
            "states": states,
            "linear_layers": [layer + 1 for layer in cfg.linear_attention_layers()],
        }
    return results


def parameter_counts(names: list[str]) -> dict[str, int]:
    """Parameters of each built SUPRA model (all layers, and a hybrid)."""
    counts = {}
    for name in names:
        for label, supra in ((name, {}), (f"{name}-every2", {"every": 2})):
            counts[label] = sum(p.numel() for p in _build(model_config(name, **supra)).parameters())
    return counts
