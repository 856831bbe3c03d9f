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
copies of BlockDense from 4 to 0 and of BlockShuffle from 40 to 6: what is
left are the shuffles themselves (the middle one both ways, the output
interleave in backward; in forward the interleave pass also adds the bias).

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

    Activation copies: the middle shuffle and (with ``interleave``) the output
    interleave, once in forward and once in backward.  The bias is added by the
    interleave pass itself, so with ``interleave`` the output costs one pass
    instead of a copy and an add.  The middle activation is kept in its shuffled
    ``(B, T, q)`` layout for the ``w2`` gradient.
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, bias: torch.Tensor | None, interleave: bool
    ) -> torch.Tensor:
        blocks, q, _ = w1.shape
        s = w2.shape[1]
        tokens = x.shape[0]
        h = _bmm_token_major(_blocks_view(x, blocks), w1.transpose(1, 2))  # (T, B*q) block-major
        # z[c, t, a] = h[t, a*B + c]: view each token's h as (q, B) and move B first.
        z = h.view(tokens, q, blocks).permute(2, 0, 1).contiguous()
        del h
        if interleave:
            u = torch.bmm(z, w2.transpose(1, 2))  # (B, T, s)
            y = torch.empty(tokens, s, blocks, dtype=u.dtype, device=u.device)
            interleaved = u.permute(1, 2, 0)  # y[t, j*B + c] = u[c, t, j]
            if bias is None:
                y.copy_(interleaved)
            else:
                torch.add(interleaved, bias.view(s, blocks), out=y)
            y = y.view(tokens, s * blocks)
        else:
            y = _bmm_token_major(z, w2.transpose(1, 2))  # y[t, c*s + j] = u[c, t, j]
            if bias is not None:
                y.add_(bias)
        ctx.interleave = interleave
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
        if ctx.interleave:
            grad_u = grad.view(tokens, -1, blocks).permute(2, 0, 1).contiguous()  # (B, T, s)
        else:
            grad_u = _blocks_view(grad, blocks)
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
        return grad_x, grad_w1, grad_w2, grad_bias, None


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
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    interleave_output: bool = True,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """BlockShuffle product ``P_out · blockdiag(w2) · P_mid · blockdiag(w1) · x`` (+ ``bias``).

    ``w1``: ``(B, q, n)``, ``w2``: ``(B, s, q)``.  Group ``c`` of the middle
    receives ``z_c[a] = h[a*B + c]`` (view h as ``(q, B)`` and transpose) and the
    output is ``y[t*B + c] = u_c[t]``.  With ``interleave_output=False`` the output
    stays block-major (``y[c*s + t] = u_c[t]``): a fixed permutation of the same
    map, used for FFN hidden units so that a tensor-parallel rank owns whole
    output blocks (and one activation copy cheaper in forward and backward).
    ``bias`` (length ``B*s``, in output order) is fused into the output pass.
    """
    blocks, _, _ = w1.shape
    s = w2.shape[1]
    tensors = (_tokens_major(x), w1, w2) + (() if bias is None else (bias,))
    x2d, w1, w2, *rest = _autocast(*tensors)
    out = _MonarchMatmul.apply(x2d, w1, w2, rest[0] if rest else None, interleave_output)
    return out.view(*x.shape[:-1], blocks * s)
