"""Which slice of each full factor a tensor-parallel rank holds.

Pure index arithmetic, no process groups: the modules, the checkpoint code,
the planning tools and the tests all derive a rank's shard from these
functions, so a shard is defined in exactly one place.  Every layout here is
independent of the tensor-parallel size in the sense that matters for
checkpoints: the *global* tensors (and the FFN's hidden-unit order) are the
same at any TP size; only the slice a rank holds changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TPLayout:
    """A rank's place in its tensor-parallel group."""

    rank: int
    size: int

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank={self.rank} is outside a group of size={self.size}")


def require_divisible(what: str, value: int, tp: int, unit: str = "tensor_model_parallel_size") -> None:
    """Raise a ValueError naming both numbers when ``value`` cannot be split ``tp`` ways."""
    if value % tp:
        raise ValueError(f"{what}={value} is not divisible by {unit}={tp}")


def shard_ranges(total: int, layout: TPLayout, stride: int = 1) -> list[slice]:
    """The ranges of ``range(total)`` a rank owns: ``stride`` equal parts, each cut in ``size`` chunks.

    ``stride`` > 1 describes a fused output such as a gated FFN's
    ``[gate, value]`` fc1: the rank owns chunk ``rank`` of every part, so the
    local tensor is ``[gate_r, value_r]`` exactly like megatron's
    ``ColumnParallelLinear(stride=2)``.
    """
    part = total // stride
    chunk = part // layout.size
    return [slice(p * part + layout.rank * chunk, p * part + (layout.rank + 1) * chunk) for p in range(stride)]


def take_rows(full: torch.Tensor, ranges: list[slice], dim: int = 0) -> torch.Tensor:
    """Concatenate the ``ranges`` of ``full`` along ``dim`` (a copy, detached from ``full``)."""
    return torch.cat([full.narrow(dim, r.start, r.stop - r.start) for r in ranges], dim=dim).clone()


def padded_tokens(tokens: int, tp: int) -> int:
    """Token count a token-split product runs on: ``tokens`` rounded up to a multiple of ``tp``.

    Token-split factors cut the flattened ``[s*b]`` tokens into ``tp`` equal
    contiguous slices; when ``s*b`` is not a multiple of ``tp`` the batch is
    padded with zero tokens, which costs at most ``tp - 1`` tokens of compute
    and changes no result (a zero token has zero output and zero gradient).
    """
    return -(-tokens // tp) * tp


# -- BlockShuffle -----------------------------------------------------------
#
# fc1 (d -> f) computes h = blockdiag(W1) x with W1 (B, q, n), q = n = d/B,
# and group c of the shuffle reads z_c[a] = h[a*B + c].  A rank owning output
# blocks (groups) c in C_r needs only the rows i of h with i % B in C_r.  When
# B divides q that is row rho of every W1 block with rho % B in C_r, i.e. 1/tp
# of W1: viewing W1 as (B_j, q/B, B_c, n) the rank holds the slice c in C_r.
# The "group-major" layout (B_c, B_j, q/B, n) puts that axis first, so the
# shard is a contiguous axis-0 slice like every other fc1 output factor.


def require_blockshuffle_layout(hidden: int, blocks: int) -> None:
    """BlockShuffle's sharded shuffle needs ``blocks`` to divide the per-block width ``hidden/blocks``."""
    if hidden % blocks or (hidden // blocks) % blocks:
        raise ValueError(
            f"blockshuffle: tensor-parallel layout needs (hidden_size / blocks) % blocks == 0, i.e. blocks**2 "
            f"divides hidden_size; got hidden_size={hidden}, blocks={blocks}"
        )


def w1_to_group_major(w1: torch.Tensor) -> torch.Tensor:
    """``(B, q, n)`` -> ``(B_c, B_j, q/B, n)`` with ``out[c, j, a] = w1[j, a*B + c]``."""
    blocks, q, n = w1.shape
    return w1.reshape(blocks, q // blocks, blocks, n).permute(2, 0, 1, 3).contiguous()


def w1_from_group_major(grouped: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`w1_to_group_major`."""
    groups, blocks, per, n = grouped.shape
    return grouped.permute(1, 2, 0, 3).reshape(blocks, per * groups, n)
