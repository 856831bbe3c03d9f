"""Batched products behind the structured layers.

Block-diagonal factors are stored as one ``(B, out_block, in_block)`` tensor and
applied with a single ``bmm`` over a strided ``(B, T, in_block)`` view of the
token-major input, so B small products cost one call and no input copy.

Why hand-written autograd functions: autograd's ``bmm`` returns batch-major
``(B, T, m)`` results, and turning them back into token-major ``(T, B*m)``
activations (and the same again for every gradient in backward) costs a full
copy of the activation per product.  ``bmm`` can instead write straight into a
strided view of token-major storage (each block's rows are then ``B*m`` apart,
a layout BLAS accepts), but autograd cannot record ``out=`` calls.  Profiled on
one FFN step (fc1, GELU, fc2, forward and backward), this cut the activation
copies of BlockDense from 4 to 0 and of BlockShuffle from 40 to 8: what is
left are the shuffles themselves (the middle shuffle and the output interleave
of both linears, each once forward and once backward; in forward the
interleave pass also adds the bias).

Under autocast the inputs are cast to the autocast dtype before entering the
functions (autograd records the casts, so fp32 master weights still receive
fp32 gradients), because ``out=`` products are not autocast themselves.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def _blocks_view(tokens_major: torch.Tensor, blocks: int) -> torch.Tensor:
    """``(T, B*n)`` -> ``(B, T, n)`` strided view (no copy); block ``c`` is columns ``c*n .. (c+1)*n``."""
    tokens, width = tokens_major.shape
    return tokens_major.view(tokens, blocks, width // blocks).transpose(0, 1)


def _bmm_token_major(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``bmm`` of ``(B, T, k)`` by ``(B, k, m)`` written straight into token-major ``(T, B*m)`` storage."""
    blocks, tokens, _ = a.shape
    width = b.shape[-1]
    out = torch.empty(tokens, blocks, width, dtype=a.dtype, device=a.device)
    torch.bmm(a, b, out=out.transpose(0, 1))
    return out.view(tokens, blocks * width)


def _autocast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in tensors)


class _BlockDiagMatmul(torch.autograd.Function):
    """``(T, B*n)`` input, ``(B, m, n)`` weight -> ``(T, B*m)``, all token-major, no activation copies."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return _bmm_token_major(_blocks_view(x, weight.shape[0]), weight.transpose(1, 2))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_blocks = _blocks_view(grad.contiguous(), weight.shape[0])  # (B, T, m)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = _bmm_token_major(grad_blocks, weight)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.bmm(grad_blocks.transpose(1, 2), _blocks_view(x, weight.shape[0]))
        return grad_x, grad_weight


class _MonarchMatmul(torch.autograd.Function):
    """``P_out · blockdiag(w2) · P_mid · blockdiag(w1) · x + bias`` on token-major ``(T, N)`` input.

    Activation copies: the middle shuffle and the output interleave, once in
    forward and once in backward.  The bias is added by the interleave pass
    itself, so the output costs one pass instead of a copy and an add.  The
    middle activation is kept in its shuffled ``(B, T, q)`` layout for the
    ``w2`` gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        blocks, q, _ = w1.shape
        tokens = x.shape[0]
        h = _bmm_token_major(_blocks_view(x, blocks), w1.transpose(1, 2))  # (T, B*q) block-major
        # z[c, t, a] = h[t, a*B + c]: view each token's h as (q, B) and move B first.
        z = h.view(tokens, q, blocks).permute(2, 0, 1).contiguous()
        del h
        y = _interleave(torch.bmm(z, w2.transpose(1, 2)), bias)
        ctx.save_for_backward(x, w1, w2, z)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, w1, w2, z = ctx.saved_tensors
        blocks, q, _ = w1.shape
        tokens = x.shape[0]
        grad = grad.contiguous()
        grad_bias = grad.sum(0) if ctx.needs_input_grad[3] else None
        grad_u = _deinterleave(grad, blocks)
        grad_w1 = grad_w2 = grad_x = None
        if ctx.needs_input_grad[2]:
            grad_w2 = torch.bmm(grad_u.transpose(1, 2), z)
        grad_z = torch.bmm(grad_u, w2)  # (B, T, q)
        del z, grad_u
        grad_h = _blocks_view(grad_z.permute(1, 2, 0).reshape(tokens, q * blocks), blocks)  # unshuffle
        del grad_z
        if ctx.needs_input_grad[0]:
            grad_x = _bmm_token_major(grad_h, w1)
        if ctx.needs_input_grad[1]:
            grad_w1 = torch.bmm(grad_h.transpose(1, 2), _blocks_view(x, blocks))
        return grad_x, grad_w1, grad_w2, grad_bias


def _interleave(u: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``(B, T, s)`` group outputs -> token-major ``y[t, j*B + c] = u[c, t, j]`` (+ ``bias``) in one pass."""
    blocks, tokens, s = u.shape
    y = torch.empty(tokens, s, blocks, dtype=u.dtype, device=u.device)
    interleaved = u.permute(1, 2, 0)
    if bias is None:
        y.copy_(interleaved)
    else:
        torch.add(interleaved, bias.view(s, blocks), out=y)
    return y.view(tokens, s * blocks)


def _deinterleave(grad: torch.Tensor, blocks: int) -> torch.Tensor:
    """Inverse of :func:`_interleave` on a contiguous ``(T, s*B)`` gradient -> ``(B, T, s)``."""
    return grad.view(grad.shape[0], -1, blocks).permute(2, 0, 1).contiguous()


class _ShuffleBlocksMatmul(torch.autograd.Function):
    """``P_out · blockdiag(w2) · P_mid · h`` on a block-major ``(T, B*q)`` middle vector computed elsewhere."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        blocks, _, q = w2.shape
        z = h.view(h.shape[0], q, blocks).permute(2, 0, 1).contiguous()
        ctx.save_for_backward(z, w2)
        return _interleave(torch.bmm(z, w2.transpose(1, 2)), None)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        z, w2 = ctx.saved_tensors
        blocks, tokens, q = z.shape
        grad_u = _deinterleave(grad.contiguous(), blocks)
        grad_w2 = torch.bmm(grad_u.transpose(1, 2), z) if ctx.needs_input_grad[1] else None
        grad_h = torch.bmm(grad_u, w2).permute(1, 2, 0).reshape(tokens, q * blocks)
        return grad_h, grad_w2


def _tokens_major(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def block_diag_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Apply ``blockdiag(weight)`` to the last dim of ``x``; result is block-major.

    ``x``: ``(..., B * n)``, ``weight``: ``(B, m, n)`` -> ``(..., B * m)`` where
    output chunk ``c`` is ``weight[c] @ x_chunk_c``.
    """
    blocks, m, _ = weight.shape
    x2d, weight = _autocast(_tokens_major(x), weight)
    return _BlockDiagMatmul.apply(x2d, weight).view(*x.shape[:-1], blocks * m)


def monarch_matmul(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """BlockShuffle product ``P_out · blockdiag(w2) · P_mid · blockdiag(w1) · x`` (+ ``bias``).

    ``w1``: ``(B, q, n)``, ``w2``: ``(B, s, q)``.  Group ``c`` of the middle
    receives ``z_c[a] = h[a*B + c]`` (view h as ``(q, B)`` and transpose) and the
    output is ``y[t*B + c] = u_c[t]``.  ``bias`` (length ``B*s``, in output
    order) is fused into the output pass.
    """
    blocks, _, _ = w1.shape
    s = w2.shape[1]
    tensors = (_tokens_major(x), w1, w2) + (() if bias is None else (bias,))
    x2d, w1, w2, *rest = _autocast(*tensors)
    out = _MonarchMatmul.apply(x2d, w1, w2, rest[0] if rest else None)
    return out.view(*x.shape[:-1], blocks * s)


def shuffle_blocks_matmul(h: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The second half of :func:`monarch_matmul`, ``P_out · blockdiag(w2) · P_mid · h``, for a given ``h``.

    ``h``: ``(..., B*q)`` block-major (the output of ``blockdiag(w1)``),
    ``w2``: ``(B, s, q)``.  Used where ``h`` is assembled from several
    tensor-parallel ranks' blocks.
    """
    blocks, s, _ = w2.shape
    h2d, w2 = _autocast(_tokens_major(h), w2)
    return _ShuffleBlocksMatmul.apply(h2d, w2).view(*h.shape[:-1], blocks * s)
