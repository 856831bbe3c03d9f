"""The FFN benchmark runs end to end at a tiny size and reports the paper's sizes and FLOP ratios.

Timings are not asserted (they depend on the machine); the accounting is.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "ffn_bench.py"


@pytest.fixture(scope="module")
def ffn_bench():
    spec = importlib.util.spec_from_file_location("ffn_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)  # main() sets it process-wide
    del sys.modules[spec.name]


def test_benchmark_reports_every_case_with_paper_sizes(ffn_bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rows = ffn_bench.main(
        ["--width", "64", "--tokens", "32", "--repeats", "2", "--warmup", "1", "--threads", "1", "--json", str(out)]
    )
    d, f = 64, 256
    expected = {  # (structure, ratio) -> (R, B, FFN weight params), from the spec's rules at f = 4d
        ("dense", None): (None, None, 2 * d * f),
        ("lowrank", 0.63): (d // 2, None, 2 * (d + f) * (d // 2)),
        ("lowrank", 0.32): (d // 4, None, 2 * (d + f) * (d // 4)),
        ("blockshuffle", 0.63): (None, 2, 2 * d * (d + f) // 2),
        ("blockshuffle", 0.32): (None, 4, 2 * d * (d + f) // 4),
    }
    got = {(r["structure"], r["target_ratio"]): r for r in rows}
    assert rows[0]["structure"] == "dense"
    assert len(rows) == 7
    for key, (rank, blocks, params) in expected.items():
        row = got[key]
        assert (row["rank"], row["blocks"], row["weight_params"]) == (rank, blocks, params), key
        assert row["ideal_speedup"] == pytest.approx(2 * d * f / params)
    for ratio in (0.63, 0.32):  # BlockDense: B=4, R a multiple of B, ratio 5R(1 + 1/B)/(8d) near the target
        row = got[("blockdense", ratio)]
        assert row["blocks"] == 4 and row["rank"] % 4 == 0
        assert 5 * row["rank"] * (1 + 1 / 4) / (8 * d) == pytest.approx(row["achieved_ratio"])
        assert abs(row["achieved_ratio"] / ratio - 1) < 0.1
    for row in rows:
        assert len(row["fwd_bwd_ms_runs"]) == len(row["fwd_ms_runs"]) == 2
        assert row["fwd_bwd_speedup"] == pytest.approx(rows[0]["fwd_bwd_ms"] / row["fwd_bwd_ms"])
        assert row["fwd_bwd_efficiency"] == pytest.approx(row["fwd_bwd_speedup"] / row["ideal_speedup"])
        for key in ("fwd", "fwd_bwd"):  # the linears at the FLOP ratio, the full-width GELU as measured
            dense_ms, gelu_ms = rows[0][f"{key}_ms"], row[f"gelu_{key}_ms"]
            expected = dense_ms / ((dense_ms - gelu_ms) / row["ideal_speedup"] + gelu_ms)
            assert row[f"{key}_bound"] == pytest.approx(expected)
    assert rows[0]["fwd_bound"] == pytest.approx(1.0)

    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    assert saved["config"]["width"] == d and saved["config"]["threads"] == 1
    table = capsys.readouterr().out
    assert all(text in table for text in ("dense", "lowrank", "blockdense", "blockshuffle", "R=16", "B=4"))


def test_matmul_floor_sums_the_profiled_products(ffn_bench, capsys):
    """The floor columns come from the BLAS time of the same runs: positive, below the run time, formula as documented."""
    rows = ffn_bench.main(
        ["--width", "64", "--tokens", "32", "--repeats", "2", "--warmup", "0", "--threads", "1"]
        + ["--structures", "blockshuffle", "--ratios", "0.32", "--matmul-floor"]
    )
    dense = rows[0]
    for row in rows:
        for key in ("fwd", "fwd_bwd"):
            matmuls = row[f"matmul_{key}_ms"]
            assert 0 < matmuls < row[f"{key}_ms"], (row["structure"], key)
            assert row[f"{key}_floor"] == pytest.approx(dense[f"{key}_ms"] / (matmuls + row[f"gelu_{key}_ms"]))
            assert row[f"matmul_{key}_speedup"] == pytest.approx(dense[f"matmul_{key}_ms"] / matmuls)
    assert "matmul speedup fwd" in capsys.readouterr().out


def test_matmul_time_counts_only_the_products(ffn_bench):
    """A run of one known ``mm`` and an elementwise op: only the ``mm`` is counted."""
    a = torch.randn(256, 256)

    def work() -> None:
        torch.mm(a, a)
        torch.tanh(a).exp()

    def products_only() -> None:
        torch.mm(a, a)

    def elementwise_only() -> None:
        torch.tanh(a).exp()

    assert ffn_bench.matmul_ms(elementwise_only) == 0
    assert ffn_bench.matmul_ms(products_only) > 0
    assert ffn_bench.matmul_ms(work) > 0


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--structures", "sparse"], "unknown sparse"),
        (["--ratios", "half"], "--ratios='half'"),
        (["--tokens", "0"], "--tokens=0 must be positive"),
        (["--clock", "process", "--threads", "2"], "--clock process: CPU time equals compute time only"),
        (["--matmul-floor", "--clock", "process", "--threads", "1"], "--matmul-floor: the profiler's op times"),
    ],
)
def test_bad_arguments_are_reported(ffn_bench, argv, message, capsys):
    with pytest.raises(SystemExit):
        ffn_bench.main(["--width", "64", *argv])
    assert message in capsys.readouterr().err


def test_unreachable_ratio_names_the_values(ffn_bench):
    with pytest.raises(SystemExit, match=r"ratio=1.5"):
        ffn_bench.main(["--width", "64", "--ratios", "1.5", "--structures", "lowrank"])


def test_command_line_with_glibc_memory_reuse(tmp_path):
    """Run as users do (a script, its own process: the malloc setting is process-wide)."""
    result = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--width",
            "64",
            "--tokens",
            "16",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--structures",
            "lowrank",
            "--ratios",
            "0.32",
            "--keep-freed-memory",
            "--threads",
            "1",
            "--clock",
            "process",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "[ffn_bench] repeat 1/1 lowrank 32% (R=16)" in result.stderr  # progress goes to stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines[-3:-1]] == ["dense", "lowrank"]
    assert lines[-1].startswith("GELU alone (tokens x f): fwd ")
