"""The built GPTModel has the paper's architecture, and the CPU adaptation behaves like CUDA would.

Model building runs in one worker process (``nproc=1``) so megatron's global
state and the CPU device mode stay out of the pytest process.
"""

from __future__ import annotations

import pytest
import torch

from megatron_sffn.config import ModelConfig
from megatron_sffn.cpu_compat import CudaToCpuMode
from megatron_sffn.structured import weight_params
from tests.mp_harness import launch
from tests.workers.model_parallel import TINY, tiny_config

CONFIGS = {
    "dense": {"structure": "dense"},
    "dense_untied": {"structure": "dense", "tie_embeddings": False},
    "dense_swiglu": {"structure": "dense", "activation": "swiglu"},
    "lowrank": {"structure": "lowrank"},
    "blockdense": {"structure": "blockdense"},
    "blockshuffle": {"structure": "blockshuffle"},
}
STRUCTURED_FC = {"lowrank": "LowRank", "blockdense": "BlockDense", "blockshuffle": "BlockShuffle"}


@pytest.fixture(scope="module")
def built():
    run = launch(
        "tests.workers.model_parallel",
        ["model_properties", "core_attention_matches_reference", "rng_tracker_behaviour"],
        nproc=1,
        timeout=300,
        kwargs={"model_properties": {"configs": CONFIGS}},
    )
    return run.results[0]


def expected_param_count(cfg: ModelConfig) -> int:
    """Closed-form parameter count of the paper's GPT, independent of megatron."""
    d, v = cfg.hidden_size, cfg.vocab_size
    qkv_out = cfg.attention_width + 2 * cfg.kv_width
    attention = d * qkv_out + qkv_out + cfg.attention_width * d + d
    norms = 2 * (2 * d)
    total = v * d * (1 if cfg.tie_embeddings else 2) + 2 * d  # embeddings, final norm
    for layer in range(cfg.num_layers):
        kind = cfg.ffn.structure if cfg.ffn.is_structured(layer) else "dense"
        sizes = (cfg.ffn.rank, cfg.ffn.blocks) if kind != "dense" else (None, None)
        ffn = sum(weight_params(kind, n, m, *sizes) + m for n, m in cfg.ffn_shapes())
        total += attention + norms + ffn
    return total


@pytest.mark.multiproc
@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameter_count_matches_closed_form(built, name):
    spec = dict(CONFIGS[name])
    cfg = tiny_config(spec.pop("structure"), **spec)
    assert built["model_properties"][name]["num_params"] == expected_param_count(cfg)


@pytest.mark.multiproc
@pytest.mark.parametrize("structure", list(STRUCTURED_FC))
def test_layer0_ffn_dense_and_the_others_structured(built, structure):
    props = built["model_properties"][structure]
    for classes in (props["fc1_classes"], props["fc2_classes"]):
        assert "Column" in classes[0] or "Row" in classes[0], classes
        assert all(name.startswith(STRUCTURED_FC[structure]) for name in classes[1:]), classes
    # the pre-MLP LayerNorm is a module of its own in every layer (no fused norm on the local backend)
    assert set(props["pre_mlp_norms"]) == {"LayerNorm"}


@pytest.mark.multiproc
def test_every_dense_weight_is_normal_002_without_depth_scaling(built):
    props = built["model_properties"]["dense"]
    # megatron's default would give the output projections std 0.02 / sqrt(2 * layers) = 0.0071 here
    for name, std in props["std"].items():
        assert std == pytest.approx(0.02, rel=0.05), name
        assert abs(props["mean"][name]) < 0.002, name
    assert props["bias_abs_max"] == 0.0
    assert props["norm_weights"] == [1.0]


@pytest.mark.multiproc
def test_embeddings_tied_by_default_and_untied_on_request(built):
    tied, untied = built["model_properties"]["dense"], built["model_properties"]["dense_untied"]
    assert tied["shares_embedding"] and not tied["has_output_weight"]
    assert untied["has_output_weight"]
    assert untied["num_params"] - tied["num_params"] == TINY["vocab_size"] * TINY["hidden_size"]


@pytest.mark.multiproc
def test_cpu_core_attention_matches_plain_softmax_and_megatron(built):
    assert built["model_properties"]["dense"]["core_attention"] == "SDPACoreAttention"
    errors = built["core_attention_matches_reference"]
    assert all(err < 1e-5 for err in errors.values()), errors


@pytest.mark.multiproc
def test_cpu_rng_tracker_forks_named_streams(built):
    rng = built["rng_tracker_behaviour"]
    assert rng["restores_outer_state"] and rng["stream_advances"] and rng["reseed_replays"]
    assert rng["differs_from_default"]
    assert {"model-parallel-rng", "data-parallel-rng"} <= set(rng["streams"])


def test_device_mode_sends_cuda_to_cpu_and_answers_cuda_type_names():
    with CudaToCpuMode():
        made = torch.zeros(3, device="cuda")
        indexed = torch.empty(2, device=0)
        moved = torch.ones(2).to("cuda:0")
        kept = torch.ones(2).cuda()
        name = made.type()
        converted = made.type("torch.cuda.HalfTensor")
    assert {t.device.type for t in (made, indexed, moved, kept)} == {"cpu"}
    assert name == "torch.cuda.FloatTensor"
    assert converted.dtype == torch.float16 and converted.device.type == "cpu"
    assert torch.zeros(1).type() == "torch.FloatTensor"  # the mode ends with its context
