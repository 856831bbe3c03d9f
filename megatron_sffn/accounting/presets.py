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
import functools
from dataclasses import dataclass
from typing import Any

from ..config.model import FFNConfig, ModelConfig
from ..structured import counts
from .ratio import paper_ffn_sizes, solve_ffn_sizes

# Shapes only: vocab 32000 (LLaMA tokenizer) and context 1024 are ModelConfig's defaults.
_SHAPES: dict[str, dict[str, Any]] = {
    "s": dict(hidden_size=768, num_layers=12, num_attention_heads=12),
    "m": dict(hidden_size=1024, num_layers=24, num_attention_heads=16),
    "l": dict(hidden_size=1536, num_layers=24, num_attention_heads=12, kv_channels=128),
    "xl": dict(hidden_size=2048, num_layers=24, num_attention_heads=16, kv_channels=128),
    "m-wide": dict(
        hidden_size=1024,
        num_layers=24,
        ffn_hidden_size=4864,
        num_attention_heads=8,
        num_query_groups=4,
        kv_channels=64,
        ffn=dict(structure="lowrank", rank=512),
    ),
    "l-wide": dict(
        hidden_size=1536,
        num_layers=24,
        ffn_hidden_size=7424,
        num_attention_heads=12,
        num_query_groups=4,
        kv_channels=64,
        ffn=dict(structure="lowrank", rank=768),
    ),
}

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


def preset(
    name: str,
    *,
    structure: str | None = None,
    ratio: float | None = None,
    rank: int | None = None,
    blocks: int | None = None,
    rank_multiple: int | None = None,
    **overrides: Any,
) -> ModelConfig:
    """A paper model, optionally with another FFN structure.

    ``preset("xl", structure="lowrank", ratio=0.32)`` gives R=512, the paper's
    setting (BlockDense takes the paper's block count for the size unless
    ``blocks`` is given); see :func:`with_structure` for the other options.
    ``overrides`` replace ModelConfig fields (``seq_length=2048``, ...) before
    the sizes are solved.  Without ``structure`` the preset's own FFN is kept
    (dense, or LowRank for the wide models).
    """
    _check_name(name)
    fields = dict(_SHAPES[name])
    ffn = FFNConfig(**fields.pop("ffn", {}))
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise ValueError(f"preset {name!r}: unknown ModelConfig fields {sorted(unknown)}")
    cfg = ModelConfig(**{**fields, "ffn": ffn, **overrides})
    if structure is None:
        if any(v is not None for v in (ratio, rank, blocks, rank_multiple)):
            raise ValueError(f"preset {name!r}: ratio/rank/blocks/rank_multiple given without a structure")
        return cfg
    if structure == "blockdense" and ratio is not None and blocks is None:
        if name not in PAPER_BLOCKDENSE_BLOCKS:
            raise ValueError(f"preset {name!r} has no paper BlockDense block count; pass blocks explicitly")
        blocks = PAPER_BLOCKDENSE_BLOCKS[name]
    return with_structure(cfg, structure, ratio=ratio, rank=rank, blocks=blocks, rank_multiple=rank_multiple)


def with_structure(
    cfg: ModelConfig,
    structure: str,
    *,
    ratio: float | None = None,
    rank: int | None = None,
    blocks: int | None = None,
    rank_multiple: int | None = None,
) -> ModelConfig:
    """``cfg`` with its structured FFN layers changed to ``structure``.

    With ``ratio`` the sizes are solved: by the paper's rule (R a multiple of
    256 where possible) or, with ``rank_multiple``, as the nearest multiple of
    it.  Otherwise ``rank``/``blocks`` are taken as given.  Which layers stay
    dense is kept from ``cfg``.
    """
    counts.check_structure(structure)
    if ratio is not None:
        if structure == "dense" or rank is not None:
            raise ValueError(f"{structure}: ratio={ratio} cannot be combined with rank={rank} or a dense FFN")
        if rank_multiple is None:
            solve = paper_ffn_sizes
        else:
            solve = functools.partial(solve_ffn_sizes, rank_multiple=rank_multiple)
        gated = cfg.activation == "swiglu"
        sizes = solve(structure, cfg.hidden_size, cfg.ffn_hidden_size, ratio, blocks=blocks, gated=gated)
        rank, blocks = sizes.rank, sizes.blocks
    elif rank_multiple is not None:
        raise ValueError(f"{structure}: rank_multiple={rank_multiple} only applies when solving from a ratio")
    counts.check_size_options(structure, rank=rank, blocks=blocks)
    ffn = dataclasses.replace(
        cfg.ffn, structure=structure, rank=rank, blocks=blocks, dense_layers=list(cfg.ffn.dense_layers)
    )
    return dataclasses.replace(cfg, ffn=ffn)


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
        ffn = {
            kind: [preset(size, structure=kind, ratio=r).ffn for r in PAPER_RATIOS]
            for kind in ("lowrank", "blockdense", "blockshuffle")
        }
        rows.append(
            SettingsRow(
                size=size,
                lowrank_rank=tuple(f.rank for f in ffn["lowrank"]),
                blockdense_blocks=PAPER_BLOCKDENSE_BLOCKS[size],
                blockdense_rank=tuple(f.rank for f in ffn["blockdense"]),
                blockshuffle_blocks=tuple(f.blocks for f in ffn["blockshuffle"]),
            )
        )
    return rows
