"""Construction of the structured layers: initialisations, sizes, argument errors, determinism."""

from __future__ import annotations

import pytest
import torch

from megatron_sffn.structured import BlockDense, BlockShuffle, Dense, LowRank, build_linear


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Initialisation runs SVDs of small matrices, where extra threads only add OpenMP barriers.

    On a busy 2-core machine those barriers made one 1024x512 SVD take 7 s
    instead of 0.1 s; the results do not depend on the thread count.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def singular_values(matrices: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(matrices.detach().double())


# --- initialisation ---------------------------------------------------------


@pytest.mark.parametrize("n,m,rank", [(48, 96, 12), (96, 40, 7)])
def test_lowrank_svd_init_is_best_rank_r_approximation_with_split_singular_values(n, m, rank):
    layer = LowRank(n, m, rank=rank)
    draw = layer.reset_parameters(generator=torch.Generator().manual_seed(0))
    assert draw.shape == (m, n)

    a, s, bh = torch.linalg.svd(draw.double(), full_matrices=False)
    truncated = a[:, :rank] @ torch.diag(s[:rank]) @ bh[:rank]
    u, v = layer.u.detach().double(), layer.v.detach().double()
    torch.testing.assert_close(u @ v, truncated, rtol=0, atol=1e-6)

    root = s[:rank].sqrt()
    torch.testing.assert_close(singular_values(u), root, rtol=1e-5, atol=0)
    torch.testing.assert_close(singular_values(v), root, rtol=1e-5, atol=0)


def test_lowrank_svd_init_draws_from_normal_002():
    layer = LowRank(256, 512, rank=16)
    draw = layer.reset_parameters(generator=torch.Generator().manual_seed(1))
    # 131k draws: the std estimate varies by ~0.2% and the mean by ~5.5e-5 (1 sigma).
    assert abs(draw.std().item() - 0.02) < 0.02 * 0.01
    assert abs(draw.mean().item()) < 3e-4


@pytest.mark.parametrize(
    "layer",
    [
        BlockDense(64, 256, rank=32, blocks=4),
        BlockDense(256, 64, rank=48, blocks=2),
        BlockShuffle(64, 256, blocks=4),
        BlockShuffle(256, 64, blocks=4),
        BlockShuffle(64, 64, blocks=2),
    ],
    ids=["blockdense-up", "blockdense-down", "blockshuffle-up", "blockshuffle-down", "blockshuffle-square"],
)
def test_ortho_init_gives_unit_singular_values_for_every_block_and_dense_factor(layer):
    factors = ("k", "u") if layer.kind == "blockdense" else ("w1", "w2")
    for name in factors:
        values = singular_values(getattr(layer, name))
        torch.testing.assert_close(values, torch.ones_like(values), rtol=0, atol=1e-5, msg=name)


def test_dense_normal_init_std():
    weight = Dense(1024, 2048).weight.detach()
    assert abs(weight.std().item() - 0.02) < 0.02 * 0.01  # 2M draws: the estimate's std is ~0.05%
    assert abs(weight.mean().item()) < 1e-4


@pytest.mark.parametrize("std", [0.01, 0.05])
def test_configured_std_is_used(std):
    weight = Dense(512, 1024, std=std).weight.detach()
    assert abs(weight.std().item() - std) < std * 0.02


@pytest.mark.parametrize(
    "kind,opts",
    [
        ("dense", {}),
        ("lowrank", {"rank": 8}),
        ("blockdense", {"rank": 8, "blocks": 4}),
        ("blockshuffle", {"blocks": 4}),
    ],
)
def test_bias_is_zero_and_skip_bias_add_returns_output_and_bias(kind, opts):
    layer = build_linear(kind, 32, 64, skip_bias_add=True, **opts)
    assert layer.bias.shape == (64,)
    assert torch.count_nonzero(layer.bias) == 0
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(3, 32)
    out, bias = layer(x)
    assert bias is layer.bias
    torch.testing.assert_close(out, layer.project(x))
    torch.testing.assert_close(out, x @ layer.to_dense().T)
    layer.skip_bias_add = False
    torch.testing.assert_close(layer(x), out + bias)


def test_no_bias():
    layer = build_linear("blockdense", 32, 64, rank=8, blocks=4, bias=False)
    assert layer.bias is None
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer(x), x @ layer.to_dense().T)


# --- sizes ------------------------------------------------------------------


@pytest.mark.parametrize("n,m", [(64, 256), (256, 64), (96, 96), (2048, 8192), (8192, 2048)])
@pytest.mark.parametrize("rank,blocks", [(16, 2), (32, 4), (48, 8)])
def test_parameter_counts_match_paper_formulas(n, m, rank, blocks):
    expected = {
        "dense": n * m,
        "lowrank": (n + m) * rank,
        "blockdense": rank * (m + n // blocks),
        "blockshuffle": min(n, m) * (n + m) // blocks,
    }
    sizes = {
        "dense": {},
        "lowrank": {"rank": rank},
        "blockdense": {"rank": rank, "blocks": blocks},
        "blockshuffle": {"blocks": blocks},
    }
    for kind, formula in expected.items():
        layer = build_linear(kind, n, m, init_method="normal", device="meta", **sizes[kind])
        assert layer.num_params() - m == layer.weight_params() == formula, kind
        assert layer.flops_per_token() == 2 * formula, kind


# --- argument errors ----------------------------------------------------------


@pytest.mark.parametrize(
    "kind,n,m,opts,pattern",
    [
        ("blockdense", 32, 64, {"rank": 6, "blocks": 4}, r"rank=6 is not divisible by blocks=4"),
        ("blockdense", 30, 64, {"rank": 8, "blocks": 4}, r"in_features=30 is not divisible by blocks=4"),
        ("blockshuffle", 30, 64, {"blocks": 4}, r"in_features=30 is not divisible by blocks=4"),
        ("blockshuffle", 32, 66, {"blocks": 4}, r"out_features=66 is not divisible by blocks=4"),
        ("lowrank", 32, 64, {"rank": 33}, r"rank=33 exceeds min\(in_features=32, out_features=64\)=32"),
        ("blockdense", 64, 16, {"rank": 20, "blocks": 4}, r"rank=20 exceeds min\(in_features=64, out_features=16\)=16"),
        ("lowrank", 32, 64, {"rank": 0}, r"rank=0"),
        ("blockshuffle", 32, 64, {"blocks": 0}, r"blocks=0"),
        ("sparse", 32, 64, {}, r"unknown structure 'sparse'"),
        ("blockshuffle", 32, 64, {"blocks": 4, "rank": 8}, r"rank=8 does not apply"),
        ("lowrank", 32, 64, {"rank": 8, "blocks": 2}, r"blocks=2 does not apply"),
        ("dense", 32, 64, {"rank": 8}, r"rank=8 does not apply"),
        ("lowrank", 32, 64, {"rank": 8, "init_method": "xavier"}, r"unknown init_method 'xavier'"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_values(kind, n, m, opts, pattern):
    with pytest.raises(ValueError, match=pattern):
        build_linear(kind, n, m, **opts)


# --- determinism --------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,opts",
    [
        ("dense", {}),
        ("lowrank", {"rank": 8}),
        ("blockdense", {"rank": 8, "blocks": 4}),
        ("blockshuffle", {"blocks": 4}),
    ],
)
def test_reset_parameters_is_deterministic_per_seed(kind, opts):
    layer = build_linear(kind, 32, 64, **opts)

    def weights(seed: int) -> list[torch.Tensor]:
        layer.reset_parameters(generator=torch.Generator().manual_seed(seed))
        return [p.detach().clone() for p in layer.parameters()]

    first, again, other = weights(7), weights(7), weights(8)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other) if a.any())
