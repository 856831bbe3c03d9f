"""Decayed causal linear attention ``o_i = Σ_{j<=i} γ^(i-j) (q_i · k_j) v_j``, per head, no denominator.

Two equivalent computations of the same function:

* :func:`chunked_decay_attention`, the training form: the sequence is cut
  into chunks of ``C`` tokens; inside a chunk the quadratic form
  ``((Q Kᵀ) ⊙ D) V`` with ``D_ij = γ^(i-j)`` (i >= j), across chunks a
  ``d_k × d_v`` state per head carries the past.  Memory is O(T·C) instead of
  O(T²); the last chunk may be shorter than ``C``.
* :func:`recurrent_decay_attention`, the decoding form: ``S ← γ S + kᵀ v``,
  ``o = q S``, constant memory per token whatever the context length.

Both accumulate in float32 (inputs of lower precision are upcast; float64 stays float64) and return
the state after the last token, so a decode can continue a chunked prefill.
The state held here is the plain ``S`` after the last token; the reference
code stores it already multiplied by γ, which is the same recurrence shifted
by one multiplication.

Tensors are ``[batch, heads, time, dim]``; ``log_decay`` is ``[heads]``
(``log γ_h``, see :mod:`.decay`).  Scaling (SUPRA scales k by 1/√d) is the
caller's.
"""

from __future__ import annotations

import importlib.util
import inspect
import math

import torch

DEFAULT_CHUNK_SIZE = 64


def _accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs (exact comparisons in tests)."""
    return torch.promote_types(t.dtype, torch.float32)


def _upcast(q, k, v, initial_state):
    dtype = _accumulation_dtype(q)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    b, h, _, dk = q.shape
    if initial_state is None:
        state = torch.zeros(b, h, dk, v.shape[-1], dtype=dtype, device=q.device)
    else:
        state = initial_state.to(dtype)
    return q, k, v, state


def chunked_decay_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked parallel form; returns (output [b, h, T, d_v] float32, final state [b, h, d_k, d_v] float32)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be positive")
    b, h, length, _ = q.shape
    q, k, v, state = _upcast(q, k, v, initial_state)
    size = min(chunk_size, length)
    chunks = math.ceil(length / size)
    pad = chunks * size - length
    if pad:  # zero keys and values past the end contribute nothing
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    q, k, v = (t.reshape(b, h, chunks, size, t.shape[-1]) for t in (q, k, v))
    g = log_decay.to(device=q.device, dtype=q.dtype).view(h, 1, 1)  # [h, 1, 1]
    pos = torch.arange(size, device=q.device)
    lag = pos[:, None] - pos[None, :]
    intra = torch.where(lag >= 0, torch.exp(g * lag.clamp(min=0)), torch.zeros((), device=q.device))  # [h, C, C]
    out = (q @ k.transpose(-1, -2) * intra[None, :, None]) @ v
    # Each chunk's keys decayed to the chunk's last real token, and the decay of the state across it.
    lengths = torch.full((chunks,), size, device=q.device)
    lengths[-1] = size - pad
    to_end = (lengths[:, None] - 1 - pos[None, :]).clamp(min=0)  # [n, C]
    chunk_kv = (k * torch.exp(g * to_end)[None, ..., None]).transpose(-1, -2) @ v  # [b, h, n, dk, dv]
    across = torch.exp(g.view(h, 1) * lengths)  # [h, n]
    before = []
    for n in range(chunks):
        before.append(state)
        state = across[None, :, n, None, None] * state + chunk_kv[:, :, n]
    carried = torch.stack(before, dim=2)  # state entering each chunk
    out = out + (q * torch.exp(g.view(h, 1) * (pos + 1))[None, :, None, :, None]) @ carried
    return out.reshape(b, h, chunks * size, -1)[:, :, :length], state


def recurrent_decay_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token recurrence (one step per token of ``q``); same returns as the chunked form."""
    q, k, v, state = _upcast(q, k, v, initial_state)
    gamma = torch.exp(log_decay.to(device=q.device, dtype=q.dtype)).view(1, -1, 1, 1)
    outputs = []
    for t in range(q.shape[2]):
        state = gamma * state + k[:, :, t, :, None] * v[:, :, t, None, :]
        outputs.append((q[:, :, t, None, :] @ state).squeeze(2))
    return torch.stack(outputs, dim=2), state


_FLA_KERNEL = None


def _fla_chunk_simple_gla():
    """``fla``'s ``chunk_simple_gla`` when the package is importable (imported on first use), else None."""
    global _FLA_KERNEL
    if _FLA_KERNEL is None:
        if importlib.util.find_spec("fla") is None:
            _FLA_KERNEL = False
        else:
            from fla.ops.simple_gla import chunk_simple_gla

            _FLA_KERNEL = chunk_simple_gla
    return _FLA_KERNEL or None


def _fla_attention(kernel, q, k, v, log_decay, initial_state):
    """The same function through ``fla`` (token-first layout, per-token log gates, scale already in k)."""
    b, h, length, _ = q.shape
    gates = log_decay.to(device=q.device, dtype=torch.float32).view(1, 1, h).expand(b, length, h)
    kwargs = {}
    if "head_first" in inspect.signature(kernel).parameters:
        kwargs["head_first"] = False
    out, state = kernel(
        q=q.transpose(1, 2).contiguous(),
        k=k.transpose(1, 2).contiguous(),
        v=v.transpose(1, 2).contiguous(),
        g=gates.contiguous(),
        scale=1.0,
        initial_state=None if initial_state is None else initial_state.float(),
        output_final_state=True,
        **kwargs,
    )
    return out.transpose(1, 2).float(), state.float()


def decay_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fastest available form: one token is a recurrent step; CUDA uses ``fla`` when installed."""
    if q.shape[2] == 1:
        return recurrent_decay_attention(q, k, v, log_decay, initial_state)
    kernel = _fla_chunk_simple_gla() if q.is_cuda else None
    if kernel is not None:
        return _fla_attention(kernel, q, k, v, log_decay, initial_state)
    return chunked_decay_attention(q, k, v, log_decay, chunk_size, initial_state)
