"""Closed-form sizes of the structured linear maps.

These formulas are the single source for parameter and FLOP accounting
(model-level accounting, ratio solving, TP tables).  The layer classes check
themselves against them, so a layer whose real parameter count drifted from
the paper's formula is caught at construction time in tests.
"""

from __future__ import annotations

# The size options a structure may take, and which of them each structure is defined by (the others mean
# nothing to it): the one table that the layers, the config, the presets and the ratio solver read.
SIZE_OPTIONS = ("rank", "blocks")
STRUCTURE_SIZES: dict[str, tuple[str, ...]] = {
    "dense": (),
    "lowrank": ("rank",),
    "blockdense": ("rank", "blocks"),
    "blockshuffle": ("blocks",),
}
STRUCTURES = tuple(STRUCTURE_SIZES)


def check_structure(kind: str) -> None:
    """Raise ValueError for a structure name that is not one of :data:`STRUCTURES`."""
    if kind not in STRUCTURE_SIZES:
        raise ValueError(f"unknown structure {kind!r}; expected one of {', '.join(STRUCTURES)}")


def check_size_options(kind: str, **sizes: int | None) -> None:
    """Raise ValueError for a size option given to a structure that does not take it.

    ``rank`` for BlockShuffle, say, must be None: a mistyped config is an
    error rather than silently ignored.
    """
    check_structure(kind)
    for option, value in sizes.items():
        if value is not None and option not in STRUCTURE_SIZES[kind]:
            raise ValueError(f"{kind}: option {option}={value} does not apply to this structure")


def validate_structure(
    kind: str, in_features: int, out_features: int, rank: int | None = None, blocks: int | None = None
) -> None:
    """Raise ValueError naming the offending values if the structure cannot be built."""
    check_structure(kind)
    if in_features <= 0 or out_features <= 0:
        raise ValueError(f"{kind}: in_features={in_features} and out_features={out_features} must be positive")
    if "rank" in STRUCTURE_SIZES[kind]:
        if rank is None or rank <= 0:
            raise ValueError(f"{kind}: rank must be a positive integer, got rank={rank}")
        limit = min(in_features, out_features)
        if rank > limit:
            raise ValueError(
                f"{kind}: rank={rank} exceeds min(in_features={in_features}, out_features={out_features})={limit}"
            )
    if "blocks" in STRUCTURE_SIZES[kind]:
        if blocks is None or blocks <= 0:
            raise ValueError(f"{kind}: blocks must be a positive integer, got blocks={blocks}")
        if in_features % blocks:
            raise ValueError(f"{kind}: in_features={in_features} is not divisible by blocks={blocks}")
    if kind == "blockdense" and rank % blocks:
        raise ValueError(f"blockdense: rank={rank} is not divisible by blocks={blocks}")
    if kind == "blockshuffle" and out_features % blocks:
        raise ValueError(f"blockshuffle: out_features={out_features} is not divisible by blocks={blocks}")


def weight_params(
    kind: str,
    in_features: int,
    out_features: int,
    rank: int | None = None,
    blocks: int | None = None,
    middle: int | None = None,
) -> int:
    """Number of weight entries (= multiply-adds per token), bias excluded.

    ``middle``: BlockShuffle's width between its factors, min(N, M) unless
    given.  A hidden-unit subset of a BlockShuffle FFN (evolving subnetwork
    training) keeps the full FFN's middle width, whichever side is smaller.
    """
    validate_structure(kind, in_features, out_features, rank, blocks)
    n, m = in_features, out_features
    if kind == "dense":
        return n * m
    if kind == "lowrank":
        return (n + m) * rank
    if kind == "blockdense":
        return rank * (m + n // blocks)
    return (min(n, m) if middle is None else middle) * (n + m) // blocks


def forward_flops_per_token(
    kind: str, in_features: int, out_features: int, rank: int | None = None, blocks: int | None = None
) -> int:
    """Forward FLOPs per token of the weight product (2 per multiply-add), as the paper counts them."""
    return 2 * weight_params(kind, in_features, out_features, rank, blocks)
