"""``python -m megatron_sffn.flops``, run in-process: the numbers it prints and its errors.

Expected values are the published ones ("Building on Efficient Foundations",
Wei et al., 2024) or counts worked out by hand in the test.
"""

from __future__ import annotations

import json

import pytest

from megatron_sffn.flops import main


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def run_json(capsys, *argv: str) -> dict:
    code, out = run(capsys, *argv, "--json")
    assert code == 0
    return json.loads(out)


def test_table1_text_shows_ours_beside_published(capsys):
    code, out = run(capsys, "--table1")
    assert code == 0
    assert "48,637 steps" in out
    assert "all rows match the published values" in out
    lines = {line.split("  ")[0]: line for line in out.splitlines()}
    dense = lines["Dense"].split()
    assert dense[1:4] == ["-", "1274.1", "1274"] and dense[-1] == "yes"
    low32 = lines["32% LowRank"].split()
    assert low32[2:4] == ["R=512", "743.6"] and "1.29e+20" in low32 and low32[-1] == "yes"


def test_table1_json_reproduces_every_row(capsys):
    published = {  # model: (params M, FFN params M, training FLOPs)
        "Dense": (1274, 805, 2.10e20),
        "63% LowRank": (985, 516, 1.66e20),
        "63% BlockDense": (955, 486, 1.61e20),
        "63% BlockShuffle": (985, 516, 1.66e20),
        "32% LowRank": (744, 275, 1.29e20),
        "32% BlockDense": (728, 260, 1.27e20),
        "32% BlockShuffle": (744, 275, 1.29e20),
    }
    report = run_json(capsys, "--table1")["table1"]
    assert report["tokens"] == 48_637 * 524_288
    assert [r["model"] for r in report["rows"]] == list(published)
    for row in report["rows"]:
        params_m, ffn_m, flops = published[row["model"]]
        assert round(row["params"] / 1e6) == params_m == row["published_params_m"]
        assert round(row["ffn_params"] / 1e6) == ffn_m
        assert f"{row['training_flops']:.2e}" == f"{flops:.2e}"
        assert row["matches"]


def test_settings(capsys):
    code, out = run(capsys, "--settings")
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert rows["s"].split() == ["s", "384", "/", "192", "B=2:", "512", "/", "256", "2", "/", "4"]
    assert rows["xl"].split() == ["xl", "1024", "/", "512", "B=4:", "1536", "/", "768", "2", "/", "4"]
    settings = run_json(capsys, "--settings")["settings"]
    assert [r["blockdense_rank"] for r in settings] == [[512, 256], [768, 384], [1024, 512], [1536, 768]]


def test_preset_with_ratio_and_paper_budget(capsys):
    report = run_json(capsys, "--model", "xl", "--structure", "lowrank", "--ratio", "0.32")["model"]
    assert (report["config"]["ffn"]["rank"], report["config"]["ffn"]["structure"]) == (512, "lowrank")
    assert round(report["parameters"]["total"] / 1e6) == 744
    assert round(report["parameters"]["ffn_weights"] / 1e6) == 275
    assert report["run"]["steps"] == 48_637
    assert f"{report['run']['training_flops']:.2e}" == "1.29e+20"
    assert report["ffn_layer_ratio"] == pytest.approx(0.3125)


def test_text_report_for_a_preset(capsys):
    code, out = run(capsys, "--model", "s")
    assert code == 0
    assert "d=768, f=3072, 12 layers, heads 12x64" in out
    assert "109.6M" in out and "(4,196 steps)" in out


def test_explicit_shapes_gqa_swiglu_untied(capsys):
    # d=64, 2 layers, 4 heads of 24 on 2 KV heads (d_attn 96, d_kv 48), f=96 SwiGLU, vocab 100, seq 32.
    report = run_json(
        capsys,
        "--hidden-size",
        "64",
        "--num-layers",
        "2",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--head-dim",
        "24",
        "--ffn-hidden-size",
        "96",
        "--vocab-size",
        "100",
        "--seq-length",
        "32",
        "--swiglu",
        "--untied-embeddings",
        "--steps",
        "10",
        "--global-batch",
        "4",
    )["model"]
    params = report["parameters"]
    per_layer_attention = 64 * (96 + 2 * 48) + (96 + 2 * 48) + 96 * 64 + 64
    per_layer_ffn = 64 * 192 + 96 * 64
    assert params["attention"] == 2 * per_layer_attention
    assert params["ffn_weights"] == 2 * per_layer_ffn
    assert params["output_layer"] == params["embedding"] == 6400
    forward = report["forward_flops_per_token"]
    assert forward["total"] == 2 * 2 * (2 * 96 * 64 + 2 * 48 * 64 + 2 * 32 * 96) + 2 * 2 * per_layer_ffn + 2 * 100 * 64
    assert report["run"] == {"tokens": 10 * 4 * 32, "steps": 10, "training_flops": 3 * forward["total"] * 1280}


def test_explicit_structure_sizes_and_rank_multiple(capsys):
    base = ("--hidden-size", "1024", "--num-layers", "4", "--heads", "16")
    report = run_json(capsys, *base, "--structure", "blockdense", "--rank", "256", "--blocks", "4")["model"]
    assert report["parameters"]["ffn_weights"] == 2 * 1024 * 4096 + 3 * 256 * (4096 + 256 + 1024 + 1024)
    assert "run" not in report  # no budget for explicit shapes unless --tokens/--steps
    report = run_json(capsys, *base, "--structure", "lowrank", "--ratio", "0.45", "--rank-multiple", "96")["model"]
    assert report["config"]["ffn"]["rank"] == 96 * round(0.45 * 1024 / 1.25 / 96)
    report = run_json(capsys, *base, "--structure", "lowrank", "--rank", "128", "--dense-layers", "0", "3")["model"]
    assert report["config"]["ffn"]["dense_layers"] == [0, 3]
    assert report["parameters"]["ffn_weights"] == 2 * 2 * 1024 * 4096 + 2 * 2 * 128 * (1024 + 4096)


def test_tokens_accepts_scientific_notation(capsys):
    report = run_json(capsys, "--model", "m", "--tokens", "6.7e9")["model"]
    run = report["run"]
    assert run["steps"] == 12_779 and run["tokens"] == 12_779 * 512 * 1024  # whole steps only
    assert run["training_flops"] == pytest.approx(3 * report["forward_flops_per_token"]["total"] * run["tokens"])


def test_sgt_same_flops_prints_the_steps_that_match_dense_flops(capsys):
    report = run_json(capsys, "--model", "m", "--structure", "lowrank", "--ratio", "0.32", "--sgt", "same_flops")["sgt"]
    assert report["ratio"] == pytest.approx(0.38, abs=0.005)  # the paper's ratio for m at 32%
    assert report["base_steps"] == 12_779
    assert report["total_steps"] == report["base_steps"] + report["extra_steps"]
    assert report["guided_steps"] == report["extra_steps"]
    assert report["expected_guide_steps"] == pytest.approx((report["guided_steps"] + 1) / 2)
    assert report["vs_dense"] == pytest.approx(1.0, abs=2e-4)
    code, out = run(
        capsys,
        "--model",
        "s",
        "--structure",
        "lowrank",
        "--ratio",
        "0.32",
        "--sgt",
        "same_flops",
        "--sgt-ratio",
        "0.30",
    )
    assert code == 0
    assert "4,196 + 1,258 = 5,454" in out and "(ratio g/S = 0.2998)" in out


def test_sgt_fixed_steps_with_explicit_steps(capsys):
    report = run_json(
        capsys,
        "--hidden-size",
        "64",
        "--num-layers",
        "3",
        "--heads",
        "4",
        "--structure",
        "lowrank",
        "--rank",
        "16",
        "--steps",
        "100",
        "--sgt",
        "fixed_steps",
        "--sgt-every-step",
    )["sgt"]
    assert (report["total_steps"], report["guided_steps"], report["expected_guide_steps"]) == (100, 50, 50.0)
    assert report["guide_flops"] == 3 * 50 * 512 * 1024 * 2 * 2 * (2 * 64 * 256)  # 2 structured layers


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--model", "s", "--structure", "lowrank", "--ratio", "0.32", "--sgt", "fixed_steps", "--sgt-ratio", "0.3"],
            "sgt.ratio=0.3 applies to sgt.mode='same_flops' only",
        ),
        (
            [
                "--hidden-size",
                "64",
                "--num-layers",
                "2",
                "--heads",
                "4",
                "--structure",
                "lowrank",
                "--rank",
                "8",
                "--sgt",
                "same_flops",
            ],
            "--sgt needs a run length",
        ),
        (["--model", "s", "--sgt", "same_flops"], "needs structured FFNs"),
        (["--model", "xl", "--hidden-size", "512"], "--model xl fixes the shapes; drop --hidden-size"),
        (["--hidden-size", "512", "--heads", "8"], "missing --num-layers"),
        (["--model", "s", "--ratio", "0.3"], "need --structure"),
        (["--model", "s", "--structure", "blockshuffle", "--ratio", "0.5"], "ratio=0.5 is unreachable"),
        (["--model", "s", "--tokens", "1.5"], "expected a positive whole number, got '1.5'"),
        (["--model", "s", "--tokens", "10", "--steps", "3"], "not allowed with argument"),
        (["--model", "xxl"], "invalid choice: 'xxl'"),
    ],
)
def test_errors_exit_with_a_message(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_supra_attention_counts_feature_maps_and_chunked_scores(capsys):
    softmax = run_json(capsys, "--model", "xl")["model"]
    supra = run_json(capsys, "--model", "xl", "--attention", "supra")["model"]
    d_attn, layers, head_dim = 2048, 24, 128
    assert supra["parameters"]["attention"] - softmax["parameters"]["attention"] == layers * (d_attn**2 + d_attn)
    f, g = supra["forward_flops_per_token"], softmax["forward_flops_per_token"]
    assert f["attention_projections"] - g["attention_projections"] == layers * 2 * 2 * d_attn**2
    assert f["attention_scores"] == layers * 2 * 2 * d_attn * (64 + head_dim)  # chunk 64, not the 1024 context
    assert g["attention_scores"] == layers * 2 * 2 * 1024 * d_attn
    hybrid = run_json(capsys, "--model", "xl", "--attention", "supra", "--supra-every", "2", "--supra-chunk-size", "32")
    scores = hybrid["model"]["forward_flops_per_token"]["attention_scores"]
    assert scores == 12 * 2 * 2 * d_attn * (32 + head_dim) + 12 * 2 * 2 * 1024 * d_attn
    code, out = run(capsys, "--model", "xl", "--attention", "supra")
    assert code == 0 and "SUPRA linear attention (lightning decay, chunk 64) in every layer" in out


def test_supra_options_need_supra_attention(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "xl", "--supra-every", "2"])
    assert exit_info.value.code == 2
    assert "--supra-chunk-size/--supra-every need --attention supra" in capsys.readouterr().err
