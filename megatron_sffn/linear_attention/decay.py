"""Fixed per-head decays γ_h of SUPRA ("Linearizing Large Language Models", Mercat et al., 2024).

``lightning`` (the paper's choice): ALiBi slopes ``s_h = (2^(-8/H))^(h+1)``
and ``γ_h = exp(-s_h)``; head 0 decays fastest.  For H = 32 this gives
γ = 0.4313, 0.4931, ..., 0.996101.  The reference code computes the slopes
only for head counts that are powers of two (it crashes otherwise); here
other counts take the standard ALiBi fallback ("Train Short, Test Long",
Press et al., 2022): the slopes of the closest smaller power of two ``n``,
then every other slope of ``2n`` heads for the remaining ``H - n`` heads.

``retnet``: ``γ_h = 1 - 2^(-5-h)`` (RetNet, Sun et al., 2023), which the
paper found worse on short contexts.

Decays are returned in log space (``log γ_h``, negative), which is what both
the chunked form and ``fla``'s kernels consume, in float64 for the callers to
cast.
"""

from __future__ import annotations

import math

import torch

DECAYS = ("lightning", "retnet")


def _power_of_two_slopes(heads: int) -> list[float]:
    start = 2.0 ** (-8.0 / heads)
    return [start ** (h + 1) for h in range(heads)]


def alibi_slopes(heads: int) -> list[float]:
    """ALiBi slopes for any positive head count (the standard fallback for non-powers of two)."""
    if heads < 1:
        raise ValueError(f"heads={heads} must be positive")
    if math.log2(heads).is_integer():
        return _power_of_two_slopes(heads)
    closest = 2 ** math.floor(math.log2(heads))
    return _power_of_two_slopes(closest) + _power_of_two_slopes(2 * closest)[0::2][: heads - closest]


def log_decays(kind: str, heads: int) -> torch.Tensor:
    """``log γ_h`` for global heads ``0..heads-1`` (float64)."""
    if kind == "lightning":
        return -torch.tensor(alibi_slopes(heads), dtype=torch.float64)
    if kind == "retnet":
        gamma = 1.0 - 2.0 ** (-5.0 - torch.arange(heads, dtype=torch.float64))
        return torch.log(gamma)
    raise ValueError(f"decay={kind!r}; expected one of {DECAYS}")
