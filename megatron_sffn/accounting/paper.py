"""Table 1 of "Building on Efficient Foundations" (Wei et al., 2024), published and recomputed.

The published columns are kept here so that tools can print our numbers
beside the paper's; the recomputed ones come only from the presets, the ratio
solver and the accounting in :mod:`megatron_sffn.accounting.model`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .model import count_parameters, training_run_flops
from .presets import preset, training_budget


@dataclass(frozen=True)
class PublishedRow:
    """One row of Table 1 as printed (Transformer-xl, 25.5B tokens)."""

    label: str
    structure: str
    ratio: float | None
    rank: int | None
    blocks: int | None
    params_m: int
    ffn_params_m: int
    training_flops: float


TABLE1 = (
    PublishedRow("Dense", "dense", None, None, None, 1274, 805, 2.10e20),
    PublishedRow("63% LowRank", "lowrank", 0.63, 1024, None, 985, 516, 1.66e20),
    PublishedRow("63% BlockDense", "blockdense", 0.63, 1536, 4, 955, 486, 1.61e20),
    PublishedRow("63% BlockShuffle", "blockshuffle", 0.63, None, 2, 985, 516, 1.66e20),
    PublishedRow("32% LowRank", "lowrank", 0.32, 512, None, 744, 275, 1.29e20),
    PublishedRow("32% BlockDense", "blockdense", 0.32, 768, 4, 728, 260, 1.27e20),
    PublishedRow("32% BlockShuffle", "blockshuffle", 0.32, None, 4, 744, 275, 1.29e20),
)


@dataclass(frozen=True)
class Table1Row:
    """Our numbers for one published row; R/B are solved from the ratio, not copied."""

    published: PublishedRow
    rank: int | None
    blocks: int | None
    params: int
    ffn_params: int
    training_flops: float


def reproduce_table1() -> list[Table1Row]:
    """Recompute every Table 1 row for the xl preset over its paper token budget (whole steps)."""
    tokens = training_budget("xl").trained_tokens
    rows = []
    for row in TABLE1:
        structure = None if row.structure == "dense" else row.structure
        cfg = preset("xl", structure=structure, ratio=row.ratio)
        params = count_parameters(cfg)
        rows.append(
            Table1Row(
                published=row,
                rank=cfg.ffn.rank,
                blocks=cfg.ffn.blocks,
                params=params.total,
                ffn_params=params.ffn_weights,
                training_flops=training_run_flops(cfg, tokens).total,
            )
        )
    return rows
