"""The models and training budgets of "Building on Efficient Foundations" (Wei et al., 2024).

Sizes s/m/l/xl are GPT models with f = 4d; m-wide and l-wide are the paper's
"wide and structured" models (wider FFN with LowRank, narrower GQA attention).
Structured variants are derived, not listed: :func:`preset` solves R and B
from a parameter ratio with the paper's rounding rule
(:func:`megatron_sffn.accounting.ratio.paper_ffn_sizes`), and
:func:`settings_table` regenerates the paper's table of R/B settings from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..accounting.ratio import FFNSizes, paper_ffn_sizes
from .model import FFNConfig, ModelConfig

# Shapes only: vocab 32000 (LLaMA tokenizer) and context 1024 are ModelConfig's defaults.
_SHAPES: dict[str, dict[str, Any]] = {
    "s": dict(hidden_size=768, num_layers=12, num_attention_heads=12),
    "m": dict(hidden_size=1024, num_layers=24, num_attention_heads=16),
    "l": dict(hidden_size=1536, num_layers=24, num_attention_heads=12, kv_channels=128),
    "xl": dict(hidden_size=2048, num_layers=24, num_attention_heads=16, kv_channels=128),
    "m-wide": dict(
        hidden_size=1024, num_layers=24, ffn_hidden_size=4864,
        num_attention_heads=8, num_query_groups=4, kv_channels=64,
        ffn=dict(structure="lowrank", rank=512),
    ),
    "l-wide": dict(
        hidden_size=1536, num_layers=24, ffn_hidden_size=7424,
        num_attention_heads=12, num_query_groups=4, kv_channels=64,
        ffn=dict(structure="lowrank", rank=768),
    ),
}  # fmt: skip

PRESETS = tuple(_SHAPES)
PAPER_SIZES = ("s", "m", "l", "xl")

# BlockDense's block count is a choice the paper made per size, not something a ratio determines.
PAPER_BLOCKDENSE_BLOCKS = {"s": 2, "m": 4, "l": 2, "xl": 4}

# The two parameter ratios the paper trains ("63%" and "32%" of the dense FFN).
PAPER_RATIOS = (0.63, 0.32)


@dataclass(frozen=True)
class TrainingBudget:
    """Peak learning rate and token budget of a paper run.

    Steps are ``floor(tokens / batch tokens)``: the paper's trainer truncates,
    which is what turns 2.2B tokens at 524,288-token batches into 4,196 steps.
    The budgets are about 20 × the dense model's parameters, rounded by hand
    (2.2B for s's 109.6M parameters), so they are data, not a formula.
    """

    peak_lr: float
    tokens: int
    global_batch: int = 512
    seq_length: int = 1024

    @property
    def batch_tokens(self) -> int:
        return self.global_batch * self.seq_length

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_tokens

    @property
    def trained_tokens(self) -> int:
        """Tokens actually consumed: whole steps only."""
        return self.steps * self.batch_tokens


# The wide models train at equal FLOPs to their dense size, hence more tokens; the
# paper gives no separate learning rate for them, so the base size's is used.
_BUDGETS = {
    "s": TrainingBudget(peak_lr=6e-4, tokens=2_200_000_000),
    "m": TrainingBudget(peak_lr=3e-4, tokens=6_700_000_000),
    "l": TrainingBudget(peak_lr=2.5e-4, tokens=14_580_000_000),
    "xl": TrainingBudget(peak_lr=2e-4, tokens=25_500_000_000),
    "m-wide": TrainingBudget(peak_lr=3e-4, tokens=10_600_000_000),
    "l-wide": TrainingBudget(peak_lr=2.5e-4, tokens=23_400_000_000),
}


def _check_name(name: str) -> None:
    if name not in _SHAPES:
        raise ValueError(f"unknown model preset {name!r}; expected one of {', '.join(PRESETS)}")


def training_budget(name: str) -> TrainingBudget:
    """The paper's peak LR and token budget for a preset."""
    _check_name(name)
    return _BUDGETS[name]


def solve_preset_ffn(name: str, structure: str, ratio: float, *, blocks: int | None = None) -> FFNSizes:
    """R/B of a structure at a parameter ratio for a preset, chosen by the paper's rule.

    BlockDense uses the paper's block count for the size unless ``blocks`` is given.
    """
    _check_name(name)
    shape = _SHAPES[name]
    d = shape["hidden_size"]
    f = shape.get("ffn_hidden_size", 4 * d)
    if structure == "blockdense" and blocks is None:
        if name not in PAPER_BLOCKDENSE_BLOCKS:
            raise ValueError(f"preset {name!r} has no paper BlockDense block count; pass blocks explicitly")
        blocks = PAPER_BLOCKDENSE_BLOCKS[name]
    return paper_ffn_sizes(structure, d, f, ratio, blocks=blocks)


def preset(
    name: str,
    *,
    structure: str | None = None,
    ratio: float | None = None,
    rank: int | None = None,
    blocks: int | None = None,
    **overrides: Any,
) -> ModelConfig:
    """A paper model, optionally with a structured FFN.

    ``preset("xl", structure="lowrank", ratio=0.32)`` gives R=512, the paper's
    setting; ``rank``/``blocks`` set the sizes directly instead of ``ratio``.
    ``overrides`` replace other ModelConfig fields (``seq_length=2048``, ...).
    Without ``structure`` the preset's own FFN is used (dense, or LowRank for
    the wide models).
    """
    _check_name(name)
    fields = dict(_SHAPES[name])
    ffn = FFNConfig(**fields.pop("ffn", {}))
    if structure is None:
        if ratio is not None or rank is not None or blocks is not None:
            raise ValueError(f"preset {name!r}: ratio/rank/blocks given without a structure")
    elif ratio is not None:
        if rank is not None:
            raise ValueError(f"preset {name!r}: give either ratio={ratio} or rank={rank}, not both")
        if structure == "dense":
            raise ValueError(f"preset {name!r}: ratio={ratio} does not apply to a dense FFN")
        sizes = solve_preset_ffn(name, structure, ratio, blocks=blocks)
        ffn = dataclasses.replace(ffn, structure=structure, rank=sizes.rank, blocks=sizes.blocks)
    else:
        ffn = dataclasses.replace(ffn, structure=structure, rank=rank, blocks=blocks)
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise ValueError(f"preset {name!r}: unknown ModelConfig fields {sorted(unknown)}")
    return ModelConfig(**{**fields, **overrides, "ffn": ffn})


@dataclass(frozen=True)
class SettingsRow:
    """One size's R/B for each structure at the paper's two ratios (63%, 32%)."""

    size: str
    lowrank_rank: tuple[int, int]
    blockdense_blocks: int
    blockdense_rank: tuple[int, int]
    blockshuffle_blocks: tuple[int, int]


def settings_table() -> list[SettingsRow]:
    """The paper's settings table, regenerated from the ratio solver."""
    rows = []
    for size in PAPER_SIZES:
        solved = {kind: [solve_preset_ffn(size, kind, r) for r in PAPER_RATIOS] for kind in ("lowrank", "blockdense", "blockshuffle")}  # fmt: skip
        rows.append(
            SettingsRow(
                size=size,
                lowrank_rank=tuple(s.rank for s in solved["lowrank"]),
                blockdense_blocks=PAPER_BLOCKDENSE_BLOCKS[size],
                blockdense_rank=tuple(s.rank for s in solved["blockdense"]),
                blockshuffle_blocks=tuple(s.blocks for s in solved["blockshuffle"]),
            )
        )
    return rows
