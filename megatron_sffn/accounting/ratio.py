"""Choosing a structure's rank R and/or block count B from a target FFN parameter ratio.

The ratio is structured FFN weight parameters over dense FFN weight parameters
for one FFN ``d -> f -> d`` whose two layers share R and B.  Every count comes
from :func:`megatron_sffn.structured.counts.weight_params`, so the solver and
the layers can never disagree about what a size costs; in particular nothing
here assumes ``f = 4d`` (for ``f = 4d`` the counts reduce to the paper's
LowRank ``1.25 R / d``, BlockShuffle ``1.25 / B`` and BlockDense
``5R(1 + 1/B) / (8d)``).

A structure has discrete sizes, so a target ratio is met only approximately.
A solution counts as reaching the target when its ratio is within
``tolerance`` (relative, default 10%) of it.  10% is the slack the paper's own
choices need: "Building on Efficient Foundations" (Wei et al., 2024) labels
BlockDense B=4, R=1536 at d=2048 as "63%" although it has 58.6%.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..structured import counts

DEFAULT_TOLERANCE = 0.10

# The paper keeps R a multiple of 256 "where possible"; when the nearest
# multiple of 256 misses the target, the next power of two down is tried.
PAPER_RANK_MULTIPLES = (256, 128, 64, 32, 16, 8, 4, 2, 1)


@dataclass(frozen=True)
class FFNSizes:
    """R and/or B of one structure (None where the structure has no such size)."""

    rank: int | None
    blocks: int | None
    achieved_ratio: float


def ffn_shapes(d: int, f: int, *, gated: bool = False) -> tuple[tuple[int, int], tuple[int, int]]:
    """(in, out) of fc1 and fc2; a gated FFN (SwiGLU) has fc1 ``d -> 2f``."""
    return (d, 2 * f if gated else f), (f, d)


def ffn_param_ratio(
    kind: str, d: int, f: int, *, rank: int | None = None, blocks: int | None = None, gated: bool = False
) -> float:
    """Structured over dense FFN weight parameters for the given sizes."""
    shapes = ffn_shapes(d, f, gated=gated)
    structured = sum(counts.weight_params(kind, n, m, rank, blocks) for n, m in shapes)
    dense = sum(counts.weight_params("dense", n, m) for n, m in shapes)
    return structured / dense


def solve_ffn_sizes(
    kind: str,
    d: int,
    f: int,
    ratio: float,
    *,
    blocks: int | None = None,
    rank_multiple: int | None = None,
    gated: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
) -> FFNSizes:
    """Sizes whose FFN parameter ratio is nearest ``ratio`` under the divisibility rules.

    LowRank solves R (a multiple of ``rank_multiple``, default 1).  BlockDense
    solves R for the given ``blocks`` (R a multiple of both B and
    ``rank_multiple``).  BlockShuffle solves B among the block counts dividing
    both d and f, unless ``blocks`` is given.  Raises ValueError, naming the
    values, when the ratio is out of (0, 1], when the sizes cannot be built, or
    when the nearest buildable size misses the target by more than ``tolerance``.
    """
    if kind not in counts.STRUCTURES or kind == "dense":
        structured = [s for s in counts.STRUCTURES if s != "dense"]
        raise ValueError(f"cannot solve sizes for structure {kind!r}; expected one of {', '.join(structured)}")
    if not 0 < ratio <= 1:
        raise ValueError(f"{kind}: target FFN parameter ratio={ratio} is unreachable; expected 0 < ratio <= 1")
    if d <= 0 or f <= 0:
        raise ValueError(f"{kind}: d={d} and f={f} must be positive")
    takes = counts.STRUCTURE_SIZES[kind]
    if rank_multiple is not None and ("rank" not in takes or rank_multiple <= 0):
        ranked = "/".join(k for k, sizes in counts.STRUCTURE_SIZES.items() if "rank" in sizes)
        raise ValueError(
            f"{kind}: rank_multiple={rank_multiple} is invalid (it must be positive, and only {ranked} take it)"
        )
    counts.check_size_options(kind, blocks=blocks)

    if "rank" not in takes:  # sized by its block count alone
        sizes = _solve_blocks(d, f, ratio, blocks, gated)
    else:
        if "blocks" in takes and blocks is None:
            raise ValueError(f"{kind}: blocks is required to solve R for ratio={ratio} (d={d}, f={f})")
        sizes = _solve_rank(kind, d, f, ratio, blocks, rank_multiple or 1, gated)
    _check_tolerance(kind, d, f, ratio, sizes, tolerance)
    return sizes


def paper_ffn_sizes(
    kind: str,
    d: int,
    f: int,
    ratio: float,
    *,
    blocks: int | None = None,
    gated: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
) -> FFNSizes:
    """Sizes chosen the way the paper chose them: R a multiple of 256 where possible.

    Tries rank multiples 256, 128, 64, ... and keeps the first whose nearest R
    reaches the target within ``tolerance``.  This reproduces every setting the
    paper lists (for example d=768 at 32% LowRank: the nearest multiple of 256
    and of 128 both give R=256 at 41.7%, so R=192, a multiple of 64, is used).
    """
    if "rank" not in counts.STRUCTURE_SIZES.get(kind, ()):  # no R to round
        return solve_ffn_sizes(kind, d, f, ratio, blocks=blocks, gated=gated, tolerance=tolerance)
    misses = []
    for multiple in PAPER_RANK_MULTIPLES:
        try:
            return solve_ffn_sizes(
                kind, d, f, ratio, blocks=blocks, rank_multiple=multiple, gated=gated, tolerance=tolerance
            )
        except _TargetMissed as miss:
            if not any(miss.detail in seen for seen in misses):
                misses.append(f"multiple {multiple}: {miss.detail}")
    raise ValueError(
        f"{kind}: no rank reaches ratio={ratio} within {tolerance:.0%} for d={d}, f={f}, blocks={blocks}; "
        f"nearest candidates: {'; '.join(misses)}"
    )


class _TargetMissed(ValueError):
    """No size under the current rounding rule reaches the target (another rule may); ``detail`` says why briefly."""

    def __init__(self, message: str, detail: str) -> None:
        super().__init__(message)
        self.detail = detail


def _solve_rank(kind: str, d: int, f: int, ratio: float, blocks: int | None, multiple: int, gated: bool) -> FFNSizes:
    # Both counts are linear in R (R·(n+m) and R·(m + n/B)), so the ratio per
    # unit of R is read off one valid R and the exact solution follows.
    step = math.lcm(multiple, blocks or 1)
    shapes = ffn_shapes(d, f, gated=gated)
    limit = min(min(n, m) for n, m in shapes)
    for n, m in shapes:  # divisibility of the shapes by B, independent of R
        counts.validate_structure(kind, n, m, rank=blocks or 1, blocks=blocks)
    per_rank = ffn_param_ratio(kind, d, f, rank=blocks or 1, blocks=blocks, gated=gated) / (blocks or 1)
    exact = ratio / per_rank
    if step > limit:
        raise _TargetMissed(
            f"{kind}: no R is a multiple of {step} and at most min(d={d}, f={f})={limit} (blocks={blocks})",
            f"no multiple of {step} up to {limit}",
        )
    rank = min(max(math.floor(exact / step + 0.5), 1), limit // step) * step
    return FFNSizes(rank, blocks, ffn_param_ratio(kind, d, f, rank=rank, blocks=blocks, gated=gated))


def _solve_blocks(d: int, f: int, ratio: float, blocks: int | None, gated: bool) -> FFNSizes:
    if blocks is not None:
        return FFNSizes(None, blocks, ffn_param_ratio("blockshuffle", d, f, blocks=blocks, gated=gated))
    shapes = ffn_shapes(d, f, gated=gated)
    common = math.gcd(*(size for shape in shapes for size in shape))
    candidates = [b for b in range(1, common + 1) if common % b == 0]
    ratios = {b: ffn_param_ratio("blockshuffle", d, f, blocks=b, gated=gated) for b in candidates}
    best = min(candidates, key=lambda b: abs(ratios[b] / ratio - 1))
    return FFNSizes(None, best, ratios[best])


def _check_tolerance(kind: str, d: int, f: int, ratio: float, sizes: FFNSizes, tolerance: float) -> None:
    miss = abs(sizes.achieved_ratio / ratio - 1)
    if miss > tolerance:
        raise _TargetMissed(
            f"{kind}: ratio={ratio} is unreachable within {tolerance:.0%} for d={d}, f={f}: the nearest buildable "
            f"size rank={sizes.rank}, blocks={sizes.blocks} gives {sizes.achieved_ratio:.4f} ({miss:.1%} off)",
            f"rank={sizes.rank}, blocks={sizes.blocks} gives {sizes.achieved_ratio:.4f}",
        )
