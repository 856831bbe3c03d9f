"""What one tensor-parallel rank holds, computes and sends for one xl FFN, counted from the built modules.

    python benchmarks/tp_per_rank.py              # measure, print the table, check docs/tensor-parallel.md
    python benchmarks/tp_per_rank.py --markdown   # print the documentation table from the closed-form plan

The xl FFN (d 2048, f 8192) dense and with each structure at the paper's 63%
and 32% settings, at TP = 1/2/4/8.  Rank 0's MLP is built exactly as in
training (spec factory, megatron's ``MLP``) but against a
:class:`ShapeOnlyGroup`, so no other rank exists, and without drawing weights
(they are zeroed: values do not matter here).  One forward and backward over
64 tokens then gives:

* parameters: the elements of the rank's local tensors (bytes at fp32);
* FLOPs per token: counted by ``torch.utils.flop_counter.FlopCounterMode``
  (matrix products only, as the paper counts; backward is reported as a check
  that it is twice the forward);
* traffic per token: the collectives the modules ran, as recorded by
  :func:`megatron_sffn.parallel.record_traffic` (elements sent by one rank).

The dense FFN uses megatron's own linears, whose collectives are not
recorded: its FLOPs are counted from its local weights (each applied to every
token) and its traffic is megatron's (one all-reduce of d each way).

The script exits non-zero if any measured figure differs from the table in
``docs/tensor-parallel.md`` (between its ``tp-table`` markers), so the
documented figures cannot drift from the code.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from megatron_sffn.config import FFNConfig, ModelConfig  # noqa: E402
from megatron_sffn.parallel.comm import ShapeOnlyGroup, record_traffic  # noqa: E402
from megatron_sffn.parallel.mlp_spec import mlp_spec  # noqa: E402
from megatron_sffn.parallel.plan import (  # noqa: E402
    FFNShape,
    choose_strategy,
    rank_cost,
    require_shardable,  # noqa: E402
)

DOCS = ROOT / "docs" / "tensor-parallel.md"
HIDDEN, FFN_HIDDEN, TOKENS = 2048, 8192, 64
TP_SIZES = (1, 2, 4, 8)
BEGIN, END = "<!-- tp-table:begin -->", "<!-- tp-table:end -->"
COLUMNS = ("params", "fwd_flops", "overhead", "fwd_comm", "bwd_comm")


@dataclass(frozen=True)
class Setting:
    label: str
    shape: FFNShape
    strategy: str = "auto"  # the modules' ``tp_strategy``


SETTINGS = [  # the paper's xl settings (structured-ffn spec, section 1)
    Setting("dense", FFNShape("dense", HIDDEN, FFN_HIDDEN)),
    Setting("LowRank 63% (R=1024)", FFNShape("lowrank", HIDDEN, FFN_HIDDEN, rank=1024)),
    Setting("LowRank 32% (R=512)", FFNShape("lowrank", HIDDEN, FFN_HIDDEN, rank=512)),
    Setting("BlockDense 63% (B=4, R=1536)", FFNShape("blockdense", HIDDEN, FFN_HIDDEN, rank=1536, blocks=4)),
    Setting("BlockDense 32% (B=4, R=768)", FFNShape("blockdense", HIDDEN, FFN_HIDDEN, rank=768, blocks=4)),
    Setting("BlockShuffle 63% (B=2)", FFNShape("blockshuffle", HIDDEN, FFN_HIDDEN, blocks=2)),
    Setting("BlockShuffle 32% (B=4)", FFNShape("blockshuffle", HIDDEN, FFN_HIDDEN, blocks=4)),
    # the exact-FLOPs alternative the automatic plan rejects for its traffic
    Setting("BlockShuffle 32% (B=4), split", FFNShape("blockshuffle", HIDDEN, FFN_HIDDEN, blocks=4), "split/reduce"),
]


@dataclass(frozen=True)
class Row:
    """One (setting, tp) line; ``strategy`` is None for dense and for layouts that cannot be split."""

    label: str
    tp: int
    strategy: str | None
    figures: dict[str, Fraction] | None  # None: not splittable
    reason: str = ""


def _total_flops(shape: FFNShape) -> Fraction:
    return rank_cost(shape, choose_strategy(shape, 1) if shape.kind != "dense" else None, 1).forward_flops


def _build_rank0(setting: Setting, tp: int):
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    shape = setting.shape
    model_cfg = ModelConfig(
        hidden_size=HIDDEN,
        num_layers=2,
        num_attention_heads=16,
        ffn_hidden_size=FFN_HIDDEN,
        ffn=FFNConfig(structure=shape.kind, rank=shape.rank, blocks=shape.blocks),
    )
    config = TransformerConfig(
        num_layers=1,
        hidden_size=HIDDEN,
        ffn_hidden_size=FFN_HIDDEN,
        num_attention_heads=16,
        use_cpu_initialization=True,
        perform_initialization=False,
        add_bias_linear=True,
        bias_activation_fusion=False,
        tensor_model_parallel_size=tp,
    )
    mlp = build_module(
        mlp_spec(model_cfg, 1, tp_strategy=setting.strategy),
        config=config,
        ffn_hidden_size=FFN_HIDDEN,
        tp_group=ShapeOnlyGroup(0, tp),
    )
    with torch.no_grad():
        for param in mlp.parameters():
            param.zero_()
    return mlp


def measure(setting: Setting, tp: int) -> Row:
    """Build rank 0 of ``setting`` at ``tp`` and count what it holds, computes and sends."""
    from torch.utils.flop_counter import FlopCounterMode

    shape = setting.shape
    try:
        require_shardable(shape, tp)
    except ValueError as e:
        return Row(setting.label, tp, None, None, str(e))
    mlp = _build_rank0(setting, tp)
    params = sum(p.numel() for p in mlp.parameters())
    share = _total_flops(shape) / tp
    if shape.kind == "dense":
        flops = Fraction(2 * (mlp.linear_fc1.weight.numel() + mlp.linear_fc2.weight.numel()))
        traffic = Fraction(2 * HIDDEN * (tp - 1), tp)
        figures = dict(params=params, fwd_flops=flops, overhead=flops - share, fwd_comm=traffic, bwd_comm=traffic)
        return Row(setting.label, tp, None, figures)
    x = torch.zeros(TOKENS, 1, HIDDEN, requires_grad=True)
    with record_traffic() as log:
        with FlopCounterMode(display=False) as forward:
            out, bias = mlp(x)
        with FlopCounterMode(display=False) as backward:
            (out + bias).sum().backward()
    fwd_flops = Fraction(forward.get_total_flops(), TOKENS)
    if Fraction(backward.get_total_flops(), TOKENS) != 2 * fwd_flops:
        raise AssertionError(f"{setting.label} tp={tp}: backward FLOPs are not twice the forward's")
    figures = dict(
        params=params,
        fwd_flops=fwd_flops,
        overhead=fwd_flops - share,
        fwd_comm=sum((t.elements for t in log if t.direction == "forward"), Fraction(0)) / TOKENS,
        bwd_comm=sum((t.elements for t in log if t.direction == "backward"), Fraction(0)) / TOKENS,
    )
    return Row(setting.label, tp, str(mlp.linear_fc1.strategy), figures)


def planned(setting: Setting, tp: int) -> Row:
    """The same row from the closed-form plan (:func:`rank_cost`)."""
    shape = setting.shape
    try:
        require_shardable(shape, tp)
    except ValueError as e:
        return Row(setting.label, tp, None, None, str(e))
    strategy = None if shape.kind == "dense" else choose_strategy(shape, tp, setting.strategy)
    cost = rank_cost(shape, strategy, tp)
    figures = dict(
        params=cost.params,
        fwd_flops=cost.forward_flops,
        overhead=cost.forward_flops - _total_flops(shape) / tp,
        fwd_comm=cost.forward_comm,
        bwd_comm=cost.backward_comm,
    )
    return Row(setting.label, tp, None if strategy is None else str(strategy), figures)


def _number(value: Fraction) -> str:
    if value.denominator == 1:
        return f"{value.numerator:,}"
    return f"{float(value):,.3f}"


def markdown(rows: list[Row]) -> str:
    lines = [
        "| FFN | tp | strategy | params / rank | fwd FLOPs / token / rank | overhead over 1/tp "
        "| fwd traffic / token | bwd traffic / token |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.figures is None:
            lines.append(f"| {row.label} | {row.tp} | not splittable: {row.reason} | | | | | |")
            continue
        cells = [_number(Fraction(row.figures[c])) for c in COLUMNS]
        lines.append(f"| {row.label} | {row.tp} | {row.strategy or 'megatron'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _documented_rows() -> dict[tuple[str, int], list[str]]:
    if not DOCS.exists():
        raise SystemExit(f"{DOCS}: missing; it holds the table the measurements are checked against")
    text = DOCS.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{DOCS}: no table between {BEGIN} and {END}")
    table = text.split(BEGIN, 1)[1].split(END, 1)[0]
    rows = {}
    for line in table.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0], int(cells[1])] = cells[2:]
    return rows


def check_against_docs(rows: list[Row]) -> list[str]:
    """Differences between measured rows and the documented table, one line each."""
    documented = _documented_rows()
    problems = []
    for line in markdown(rows).splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        key = (cells[0], int(cells[1]))
        if key not in documented:
            problems.append(f"{DOCS.name}: no row for {key[0]} at tp={key[1]}")
        elif documented[key] != cells[2:]:
            problems.append(f"{key[0]} tp={key[1]}: documented {documented[key]}, measured {cells[2:]}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print the table from the closed-form plan and exit")
    args = parser.parse_args(argv)
    grid = [(s, tp) for s in SETTINGS for tp in TP_SIZES]
    if args.markdown:
        print(markdown([planned(s, tp) for s, tp in grid]))
        return 0
    if not dist.is_initialized():  # megatron's dense linears read the group size only under torch.distributed
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    rows = []
    for index, (setting, tp) in enumerate(grid, 1):
        print(f"[{index}/{len(grid)}] {setting.label}, tp={tp}", file=sys.stderr, flush=True)
        rows.append(measure(setting, tp))
    print(markdown(rows))
    problems = check_against_docs(rows)
    for problem in problems:
        print(f"MISMATCH {problem}", file=sys.stderr)
    print(f"{len(rows)} rows, {len(problems)} differ from {DOCS.relative_to(ROOT)}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
