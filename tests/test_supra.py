"""SUPRA linear attention: the computations agree with the naive quadratic form, the module with the paper.

The naive reference here is the definition ``O = ((Q Kᵀ) ⊙ D) V`` with
``D_ij = γ^(i-j)`` for i >= j, written independently of the implementation.
Outputs are compared before any GroupNorm (which would hide scale errors).
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from megatron_sffn.accounting.model import (
    attention_score_flops,
    count_parameters,
    forward_flops_per_token,
)
from megatron_sffn.config import ModelConfig
from megatron_sffn.linear_attention import (
    alibi_slopes,
    chunked_decay_attention,
    decay_attention,
    log_decays,
    recurrent_decay_attention,
)
from tests.mp_harness import launch


def naive(q, k, v, gamma):
    t = q.shape[2]
    lag = torch.arange(t)[:, None] - torch.arange(t)[None, :]
    decay = torch.where(lag >= 0, gamma.view(-1, 1, 1) ** lag.clamp(min=0), torch.zeros(()))
    return ((q @ k.transpose(-1, -2)) * decay.to(q.dtype)) @ v


def qkv(batch, heads, length, dim, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, length, dim, generator=gen, dtype=dtype) for _ in range(3)]


def test_lightning_decays_match_the_paper_for_32_heads():
    gamma = torch.exp(log_decays("lightning", 32))
    assert gamma[:3].tolist() == pytest.approx([0.4313, 0.4931, 0.5518], abs=1e-4)
    assert gamma[-1].item() == pytest.approx(0.996101, abs=1e-6)


def test_alibi_fallback_for_head_counts_that_are_not_powers_of_two():
    assert alibi_slopes(6) == [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]
    assert alibi_slopes(12)[:8] == alibi_slopes(8) and alibi_slopes(12)[8:] == alibi_slopes(16)[0::2][:4]
    for heads in (1, 3, 5, 7, 24, 40):
        slopes = alibi_slopes(heads)
        assert len(slopes) == heads == len(set(slopes)) and all(0 < s <= 1 for s in slopes)


def test_retnet_decays():
    assert torch.exp(log_decays("retnet", 3)).tolist() == pytest.approx([1 - 2**-5, 1 - 2**-6, 1 - 2**-7])
    with pytest.raises(ValueError, match="decay='alibi'"):
        log_decays("alibi", 4)


@pytest.mark.parametrize("chunk", [1, 3, 4, 16, 64])
@pytest.mark.parametrize("heads", [4, 6])
def test_chunked_and_recurrent_equal_naive_fp32(chunk, heads):
    q, k, v = qkv(2, heads, 23, 8)  # 23 is a multiple of none of the chunks but 1
    k = k / math.sqrt(8)
    log_gamma = log_decays("lightning", heads)
    reference = naive(q.double(), k.double(), v.double(), torch.exp(log_gamma))
    chunked, state = chunked_decay_attention(q, k, v, log_gamma, chunk)
    recurrent, state_r = recurrent_decay_attention(q, k, v, log_gamma)
    scale = reference.abs().max().item()
    assert chunked.dtype == torch.float32
    assert (chunked.double() - reference).abs().max().item() <= 1e-5 * scale
    assert (recurrent.double() - reference).abs().max().item() <= 1e-5 * scale
    assert (state - state_r).abs().max().item() <= 1e-5 * state_r.abs().max().item()


def test_chunked_equals_naive_in_float64_and_for_retnet_decay():
    q, k, v = qkv(1, 3, 37, 5, torch.float64)
    log_gamma = log_decays("retnet", 3)
    out, _ = chunked_decay_attention(q, k, v, log_gamma, 8)
    assert out.dtype == torch.float64
    assert torch.allclose(out, naive(q, k, v, torch.exp(log_gamma)), rtol=0, atol=1e-12)


def test_state_continues_a_prefill_token_by_token():
    """Prefill by the chunked form, then single-token steps from its state == one pass over everything."""
    q, k, v = qkv(2, 4, 30, 8, torch.float64)
    log_gamma = log_decays("lightning", 4)
    whole, _ = chunked_decay_attention(q, k, v, log_gamma, 4)
    parts, state = [], None
    out, state = chunked_decay_attention(q[:, :, :13], k[:, :, :13], v[:, :, :13], log_gamma, 4)
    parts.append(out)
    for t in range(13, 30):
        out, state = decay_attention(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], log_gamma, 4, state)
        parts.append(out)
    assert torch.allclose(torch.cat(parts, dim=2), whole, rtol=0, atol=1e-12)


def test_bf16_inputs_accumulate_in_fp32():
    q, k, v = (t.bfloat16() for t in qkv(1, 2, 20, 8))
    out, state = chunked_decay_attention(q, k, v, log_decays("lightning", 2), 8)
    assert out.dtype == state.dtype == torch.float32
    reference = naive(q.double(), k.double(), v.double(), torch.exp(log_decays("lightning", 2)))
    assert (out.double() - reference).abs().max().item() <= 1e-5 * reference.abs().max().item()


@pytest.mark.parametrize("chunk", [3, 8])
def test_gradients_of_chunked_equal_naive(chunk):
    q, k, v = (t.requires_grad_() for t in qkv(2, 6, 19, 4, torch.float64, seed=1))
    log_gamma = log_decays("lightning", 6)
    weights = torch.randn(2, 6, 19, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = []
    forms = (lambda: chunked_decay_attention(q, k, v, log_gamma, chunk)[0], lambda: naive(q, k, v, log_gamma.exp()))
    for forward in forms:
        q.grad = k.grad = v.grad = None
        (forward() * weights).sum().backward()
        grads.append([t.grad.clone() for t in (q, k, v)])
    for ours, ref in zip(*grads, strict=True):
        assert torch.allclose(ours, ref, rtol=0, atol=1e-10)


def test_chunked_memory_is_linear_in_length():
    """The largest intermediate grows with T·C, not T²: a 4096-token pass at chunk 16 stays far below T²."""
    q, k, v = qkv(1, 1, 4096, 4)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        chunked_decay_attention(q, k, v, log_decays("lightning", 1), 16)
    peak_alloc = max(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)
    assert peak_alloc < 4096 * 4096 * 4 / 16  # a T x T float32 score matrix would be 64 MiB


def test_config_selects_linear_layers():
    base = dict(hidden_size=32, num_layers=6, num_attention_heads=4, attention="supra")
    assert ModelConfig(**base).linear_attention_layers() == [0, 1, 2, 3, 4, 5]
    assert ModelConfig(**base, supra={"layers": [1, 4]}).linear_attention_layers() == [1, 4]
    assert ModelConfig(**base, supra={"every": 3}).linear_attention_layers() == [2, 5]
    assert ModelConfig(**{**base, "attention": "softmax"}).linear_attention_layers() == []
    with pytest.raises(ValueError, match=r"supra.layers=\[6\] names layers outside 0..5"):
        ModelConfig(**base, supra={"layers": [6]})
    with pytest.raises(ValueError, match="attention='linear'"):
        ModelConfig(**{**base, "attention": "linear"})
    with pytest.raises(ValueError, match="at most one of supra.layers"):
        ModelConfig(**base, supra={"layers": [1], "every": 2})
    with pytest.raises(ValueError, match="supra.decay='alibi'"):
        ModelConfig(**base, supra={"decay": "alibi"})


@pytest.fixture(scope="module")
def model_checks():
    run = launch(
        "tests.workers.supra_checks",
        ["attention_matches_reference", "greedy_decode_matches_full_forward", "parameter_counts"],
        nproc=1,
        timeout=300,
        kwargs={
            "attention_matches_reference": {"names": ["gqa", "mha", "six_heads"]},
            "parameter_counts": {"names": ["gqa", "mha"]},
            "greedy_decode_matches_full_forward": {
                "models": {
                    "all": {"model": "gqa"},
                    "hybrid": {"model": "six_heads", "supra": {"every": 2}},
                    "retnet_mha": {"model": "mha", "supra": {"decay": "retnet", "chunk_size": 3}},
                }
            },
        },
    )
    return run.results[0]


@pytest.mark.multiproc
@pytest.mark.parametrize("name", ["gqa", "mha", "six_heads"])
def test_attention_module_matches_the_paper_reference(model_checks, name):
    result = model_checks["attention_matches_reference"][name]
    assert result["pre_norm"] <= 1e-5 * result["pre_norm_scale"]
    assert result["output"] <= 1e-5
    expected = ["feature_map.bias", "feature_map.weight"]
    if name != "mha":  # GQA: keys get their own kv-width feature map
        expected += ["feature_map_k.bias", "feature_map_k.weight"]
    assert result["new_weights"] == expected


@pytest.mark.multiproc
@pytest.mark.parametrize("label", ["all", "hybrid", "retnet_mha"])
def test_greedy_decoding_with_the_recurrent_state_equals_full_forward(model_checks, label):
    result = model_checks["greedy_decode_matches_full_forward"][label]
    assert result["max_error"] <= 1e-5 * max(1.0, result["scale"])
    heads = 6 if label == "hybrid" else 4
    for number, state in result["states"].items():
        if number in result["linear_layers"]:
            assert state == (2, heads, 8, 8)  # [batch, heads, d_k, d_v], whatever the length
        else:
            assert state == "kv-cache"
    assert result["linear_layers"] == ([2] if label == "hybrid" else [1, 2])


@pytest.mark.multiproc
@pytest.mark.parametrize("name", ["gqa", "mha"])
def test_parameter_count_includes_the_feature_maps(model_checks, name):
    from tests.workers.supra_checks import model_config

    built = model_checks["parameter_counts"]
    for label, supra in ((name, {}), (f"{name}-every2", {"every": 2})):
        cfg = model_config(name, **supra)
        softmax = count_parameters(ModelConfig(**{**vars(cfg), "attention": "softmax"})).total
        maps = [cfg.attention_width] + ([cfg.kv_width] if name == "gqa" else [])
        linear = len(cfg.linear_attention_layers())
        assert built[label] == count_parameters(cfg).total == softmax + linear * sum(w * w + w for w in maps)


@pytest.mark.parametrize("chunk", [4, 16])
def test_score_flops_are_what_the_chunked_form_computes(chunk):
    """The accounting's per-token count equals the matmul FLOPs torch counts in the chunked form."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = ModelConfig(
        hidden_size=64,
        num_layers=2,
        num_attention_heads=4,
        seq_length=64,
        attention="supra",
        supra={"chunk_size": chunk},
    )
    q, k, v = qkv(1, 4, cfg.seq_length, cfg.kv_channels)
    with FlopCounterMode(display=False) as counter:
        chunked_decay_attention(q, k, v, log_decays("lightning", 4), chunk)
    assert attention_score_flops(cfg, 0) == counter.get_total_flops() / cfg.seq_length
    softmax = ModelConfig(**{**vars(cfg), "attention": "softmax"})
    flops, base = forward_flops_per_token(cfg), forward_flops_per_token(softmax)
    assert flops.attention_projections - base.attention_projections == 2 * 2 * 2 * 64 * 64  # q and k maps, 2 layers
    assert flops.ffn == base.ffn and flops.logits == base.logits


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("fla") is None, reason="needs CUDA and fla"
)
def test_fla_kernel_on_cuda_equals_the_pytorch_form():
    q, k, v = (t.cuda() for t in qkv(2, 4, 200, 64))
    log_gamma = log_decays("lightning", 4)
    state = torch.randn(2, 4, 64, 64, device="cuda") * 0.1
    ours, ours_state = chunked_decay_attention(q, k / 8, v, log_gamma, 64, state)
    fla, fla_state = decay_attention(q, k / 8, v, log_gamma, 64, state)
    scale = ours.abs().max().item()
    assert (fla - ours).abs().max().item() <= 1e-3 * scale
    assert (fla_state - ours_state).abs().max().item() <= 1e-3 * ours_state.abs().max().item()
