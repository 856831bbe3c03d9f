"""Every structured layer computes exactly the linear map of its factors.

The references are built here, independently of the layer code: the dense
matrix of each structure is composed from its factors with plain matrix
products (``U @ V``, ``U @ block_diag(K)``, and for BlockShuffle two 0/1
permutation matrices written from the spec's index formulas, shared with the
FFN-level check in ``tests/workers/blockshuffle_ffn.py``).  Outputs, input
gradients and factor gradients of the layers must match autograd through
those compositions.
"""

from __future__ import annotations

import pytest
import torch

from megatron_sffn.structured import BlockShuffle, block_diag_matmul, build_linear, monarch_matmul
from megatron_sffn.structured.functional import shuffle_blocks_matmul
from tests.workers.blockshuffle_ffn import blockshuffle_matrix

# (in, out) pairs: up-projection (in < out) and down-projection (in >= out).  The
# 64/128 shapes are large enough that bmm takes the BLAS path rather than its
# naive small-matrix loop, so both code paths are covered.
SHAPES = [(16, 48), (48, 16), (64, 128), (128, 64), (32, 32)]
LEADING = [(7,), (2, 5), (2, 3, 4)]
TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-4)}

STRUCTURES = [
    ("dense", {}),
    ("lowrank", {"rank": 5}),
    ("blockdense", {"rank": 8, "blocks": 4}),
    ("blockdense", {"rank": 6, "blocks": 2}),
    ("blockshuffle", {"blocks": 4}),
    ("blockshuffle", {"blocks": 2}),
]
IDS = [kind + "".join(f"-{k}{v}" for k, v in opts.items()) for kind, opts in STRUCTURES]


def compose_dense(layer, factors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The (out, in) matrix of ``layer``'s structure built from ``factors`` with plain products."""
    kind = layer.kind
    if kind == "dense":
        return factors["weight"]
    if kind == "lowrank":
        return factors["u"] @ factors["v"]
    if kind == "blockdense":
        return factors["u"] @ torch.block_diag(*factors["k"])
    return blockshuffle_matrix(factors["w1"], factors["w2"])


def factor_names(layer) -> list[str]:
    return [name for name, _ in layer.named_parameters() if name != "bias"]


def make_layer(kind: str, opts: dict, n: int, m: int, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    layer = build_linear(kind, n, m, dtype=dtype, **opts)
    with torch.no_grad():
        layer.bias.normal_()  # a nonzero bias, so that a dropped or misplaced bias is caught
    return layer


@pytest.mark.parametrize("kind,opts", STRUCTURES, ids=IDS)
@pytest.mark.parametrize("n,m", SHAPES)
def test_to_dense_equals_independent_composition(kind, opts, n, m):
    layer = make_layer(kind, opts, n, m, torch.float64)
    factors = {name: p.detach() for name, p in layer.named_parameters()}
    torch.testing.assert_close(layer.to_dense().detach(), compose_dense(layer, factors), **TOLERANCE[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("leading", LEADING, ids=lambda s: f"lead{len(s)}")
@pytest.mark.parametrize("kind,opts", STRUCTURES, ids=IDS)
@pytest.mark.parametrize("n,m", SHAPES)
def test_layer_matches_dense_reference(kind, opts, n, m, leading, dtype):
    layer = make_layer(kind, opts, n, m, dtype)
    tol = TOLERANCE[dtype]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*leading, n, generator=gen, dtype=dtype, requires_grad=True)
    g = torch.randn(*leading, m, generator=gen, dtype=dtype)

    y = layer(x)
    assert y.shape == (*leading, m)
    y.backward(g)

    # Output and input gradient against the layer's own dense matrix.
    w = layer.to_dense().detach()
    torch.testing.assert_close(y.detach(), x.detach() @ w.T + layer.bias.detach(), **tol)
    torch.testing.assert_close(x.grad, g @ w, **tol)

    # Factor and bias gradients against autograd through the independent composition.
    ref = {name: p.detach().clone().requires_grad_(True) for name, p in layer.named_parameters()}
    y_ref = x.detach() @ compose_dense(layer, ref).T + ref["bias"]
    y_ref.backward(g)
    for name in factor_names(layer) + ["bias"]:
        torch.testing.assert_close(
            dict(layer.named_parameters())[name].grad,
            ref[name].grad,
            **tol,
            msg=lambda text, name=name: f"{name}: {text}",
        )


@pytest.mark.parametrize("kind,opts", STRUCTURES, ids=IDS)
def test_gradients_when_only_input_or_only_weights_require_grad(kind, opts):
    """The hand-written backward passes skip the gradients nobody asked for; the rest must stay exact."""
    n, m = 64, 128
    layer = make_layer(kind, opts, n, m, torch.float64)
    w = layer.to_dense().detach()
    x = torch.randn(3, n, dtype=torch.float64)
    g = torch.randn(3, m, dtype=torch.float64)

    layer(x).backward(g)  # x does not require grad
    assert all(p.grad is not None for p in layer.parameters())
    expected_bias_grad = g.sum(0)
    torch.testing.assert_close(layer.bias.grad, expected_bias_grad)

    layer.requires_grad_(False)
    x.requires_grad_(True)
    layer(x).backward(g)
    torch.testing.assert_close(x.grad, g @ w, **TOLERANCE[torch.float64])


@pytest.mark.parametrize("kind,opts", STRUCTURES, ids=IDS)
def test_non_contiguous_input(kind, opts):
    n, m = 64, 32
    layer = make_layer(kind, opts, n, m, torch.float64)
    base = torch.randn(n, 5, 3, dtype=torch.float64)
    x = base.permute(2, 1, 0)  # (3, 5, n), not contiguous
    torch.testing.assert_close(layer(x), x @ layer.to_dense().detach().T + layer.bias.detach())


@pytest.mark.parametrize("n,m", [(16, 48), (48, 16)])
def test_blockshuffle_index_semantics_elementwise(n, m):
    """Pin the spec's formulas on single vectors: z_c[a] = h[a*B + c], y[t*B + c] = u_c[t]."""
    blocks = 4
    layer = BlockShuffle(n, m, blocks=blocks, bias=False, dtype=torch.float64)
    x = torch.randn(n, dtype=torch.float64)
    w1, w2 = layer.w1.detach(), layer.w2.detach()
    q, s = w1.shape[1], w2.shape[1]
    chunk = n // blocks
    h = torch.cat([w1[c] @ x[c * chunk : (c + 1) * chunk] for c in range(blocks)])
    u = [w2[c] @ torch.stack([h[a * blocks + c] for a in range(q)]) for c in range(blocks)]
    y = torch.empty(m, dtype=torch.float64)
    for c in range(blocks):
        for t in range(s):
            y[t * blocks + c] = u[c][t]
    torch.testing.assert_close(layer(x).detach(), y)


def test_block_diag_matmul_matches_block_diag_and_gradcheck():
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 6, 15, generator=gen, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(block_diag_matmul(x, weight), x @ torch.block_diag(*weight).T)
    assert torch.autograd.gradcheck(block_diag_matmul, (x, weight))


def test_monarch_matmul_gradcheck():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(2, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(2, 6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(12, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(monarch_matmul, (x, w1, w2))
    assert torch.autograd.gradcheck(lambda x, w1, w2, b: monarch_matmul(x, w1, w2, bias=b), (x, w1, w2, bias))
    h = torch.randn(2, 3, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(shuffle_blocks_matmul, (h, w2))
    torch.testing.assert_close(shuffle_blocks_matmul(block_diag_matmul(x, w1), w2), monarch_matmul(x, w1, w2))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("kind,opts", STRUCTURES, ids=IDS)
def test_bf16_forward_close_to_fp32(kind, opts):
    n, m = 64, 128
    layer32 = make_layer(kind, opts, n, m, torch.float32)
    layer16 = make_layer(kind, opts, n, m, torch.bfloat16)
    layer16.load_state_dict(layer32.state_dict())  # the same weights, rounded to bf16
    x = torch.randn(4, 8, n)
    y16 = layer16(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    assert relative_error(y16, layer32(x)) < 2e-2


@pytest.mark.parametrize("kind,opts", STRUCTURES, ids=IDS)
def test_bf16_autocast_with_fp32_master_weights(kind, opts):
    """Training runs under bf16 autocast: outputs are bf16, factor gradients fp32 and close to fp32 training."""
    n, m = 64, 128
    layer = make_layer(kind, opts, n, m, torch.float32)
    x = torch.randn(4, 8, n)
    g = torch.randn(4, 8, m)
    layer(x).backward(g)
    grads32 = {name: p.grad.clone() for name, p in layer.named_parameters()}
    layer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().backward(g)
    for name, p in layer.named_parameters():
        assert p.grad.dtype == torch.float32, name
        assert relative_error(p.grad, grads32[name]) < 3e-2, name
