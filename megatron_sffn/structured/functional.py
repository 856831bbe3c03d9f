"""Batched products behind the structured layers.

Block-diagonal factors are stored as one ``(B, out_block, in_block)`` tensor and
applied with a single ``bmm`` over a strided view of the input, so B small
matrix products cost one kernel launch and no input copy.
"""

from __future__ import annotations

import torch


def block_diag_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Apply ``blockdiag(weight)`` to the last dim of ``x``; result is block-major.

    ``x``: ``(..., B * n)``, ``weight``: ``(B, m, n)`` -> ``(..., B * m)`` where
    output chunk ``c`` is ``weight[c] @ x_chunk_c``.
    """
    blocks, m, n = weight.shape
    lead = x.shape[:-1]
    xb = x.reshape(-1, blocks, n).transpose(0, 1)  # (B, T, n), strided view
    out = torch.bmm(xb, weight.transpose(1, 2))  # (B, T, m)
    return out.transpose(0, 1).reshape(*lead, blocks * m)


def block_diag_matmul_blocks(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Like :func:`block_diag_matmul` but returns the ``(B, T, m)`` block-batched result.

    Callers that feed the result into another batched product (the Monarch
    shuffle) skip the block-major flattening copy this way.
    """
    blocks, _, n = weight.shape
    xb = x.reshape(-1, blocks, n).transpose(0, 1)
    return torch.bmm(xb, weight.transpose(1, 2))


def monarch_matmul(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, interleave_output: bool = True) -> torch.Tensor:
    """BlockShuffle product ``P_out · blockdiag(w2) · P_mid · blockdiag(w1) · x``.

    ``w1``: ``(B, q, n)``, ``w2``: ``(B, s, q)``.  Group ``c`` of the middle
    receives ``z_c[a] = h[a*B + c]`` (view h as ``(q, B)`` and transpose) and the
    output is ``y[t*B + c] = u_c[t]``.  With ``interleave_output=False`` the output
    stays block-major (``y[c*s + t] = u_c[t]``): a fixed permutation of the same
    map, used for FFN hidden units so that a tensor-parallel rank owns whole
    output blocks.
    """
    blocks, q, _ = w1.shape
    s = w2.shape[1]
    lead = x.shape[:-1]
    h = block_diag_matmul_blocks(x, w1)  # (B, T, q): h_flat[c*q + a] = h[c, t, a]
    tokens = h.shape[1]
    # z[c', t, a'] = h_flat[a'*B + c']: flatten block-major, view (q, B), move B first.
    z = h.transpose(0, 1).reshape(tokens, q, blocks).permute(2, 0, 1)  # (B, T, q)
    u = torch.bmm(z, w2.transpose(1, 2))  # (B, T, s)
    if interleave_output:
        y = u.permute(1, 2, 0)  # (T, s, B): y[t, j, c] = u_c[j]
    else:
        y = u.transpose(0, 1)  # (T, B, s)
    return y.reshape(*lead, blocks * s)
