"""Which transformers architecture computes a :class:`ModelConfig`, and the reverse.

Our GPT with pre-LN LayerNorm, GELU-tanh and biases is transformers'
``Starcoder2``; with RMSNorm and SwiGLU it is ``Llama`` (``Mistral`` is Llama
with a sliding window, which we can represent only when the window covers the
whole context).  Whatever transformers would compute differently from our
model is refused with the config field at fault, never approximated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config.model import FFNConfig, ModelConfig

CONFIG_JSON = "config.json"


@dataclass(frozen=True)
class Family:
    """How one transformers architecture names and configures what our model holds."""

    model_type: str
    architecture: str  # the ``*ForCausalLM`` class
    normalization: str
    activation: str
    hidden_acts: tuple[str, ...]  # transformers' names of our activation function
    epsilon_field: str
    ffn_in: tuple[str, ...]  # fc1's parts in our fused order (gate before value for SwiGLU)
    ffn_out: str

    @property
    def gated(self) -> bool:
        return len(self.ffn_in) > 1


STARCODER2 = Family(
    "starcoder2",
    "Starcoder2ForCausalLM",
    "LayerNorm",
    "gelu",
    ("gelu_pytorch_tanh", "gelu_new"),
    "norm_epsilon",
    ("c_fc",),
    "c_proj",
)
LLAMA = Family(
    "llama", "LlamaForCausalLM", "RMSNorm", "swiglu", ("silu",), "rms_norm_eps", ("gate_proj", "up_proj"), "down_proj"
)
MISTRAL = Family(
    "mistral",
    "MistralForCausalLM",
    "RMSNorm",
    "swiglu",
    ("silu",),
    "rms_norm_eps",
    ("gate_proj", "up_proj"),
    "down_proj",
)
FAMILIES = {f.model_type: f for f in (STARCODER2, LLAMA, MISTRAL)}

# Config attributes of features we do not build; any of them set (truthy) is refused.
_UNSUPPORTED_FEATURES = (
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
    "moe_intermediate_size",  # mixture of experts
    "use_qk_norm",
    "qk_layernorm",
    "qk_norm",  # norms on queries and keys
    "attn_logit_softcapping",
    "final_logit_softcapping",
)
_DROPOUT_FIELDS = ("attention_dropout", "residual_dropout", "embedding_dropout")


class UnsupportedConfigError(ValueError):
    """A transformers config that our model cannot compute exactly."""


def read_config_json(hf_dir: Path) -> dict[str, Any]:
    """``config.json`` of ``hf_dir`` as a mapping, with the file named in every error."""
    path = hf_dir / CONFIG_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {hf_dir} is not a transformers model directory")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level")
    return data


def family_of(hf_dir: Path) -> Family:
    """The supported architecture ``config.json`` declares (its ``model_type``)."""
    data = read_config_json(hf_dir)
    model_type = data.get("model_type")
    if model_type not in FAMILIES:
        raise UnsupportedConfigError(
            f"{hf_dir / CONFIG_JSON}: model_type={model_type!r} (architectures={data.get('architectures')}); "
            f"supported: {', '.join(FAMILIES)}"
        )
    return FAMILIES[model_type]


def load_hf_config(hf_dir: Path):
    """transformers' config object of a local model directory (``model_type`` checked first)."""
    from transformers import AutoConfig

    family_of(hf_dir)
    return AutoConfig.from_pretrained(str(hf_dir), local_files_only=True)


def _refuse(hf_dir: Path | str, field: str, value: Any, why: str) -> UnsupportedConfigError:
    return UnsupportedConfigError(f"{hf_dir}/{CONFIG_JSON}: {field}={value!r}: {why}")


def model_config_from_hf(hf_config, hf_dir: Path | str, *, seq_length: int | None = None) -> ModelConfig:
    """Our model config that computes exactly what ``hf_config`` computes, or an error naming the field.

    ``seq_length`` (default ``max_position_embeddings``) is the context our
    run trains and evaluates at; a sliding window shorter than it is refused.
    """
    family = FAMILIES[hf_config.model_type]
    for name in _UNSUPPORTED_FEATURES:
        if getattr(hf_config, name, None):
            raise _refuse(hf_dir, name, getattr(hf_config, name), "this feature is not part of our model")
    if hf_config.hidden_act not in family.hidden_acts:
        raise _refuse(hf_dir, "hidden_act", hf_config.hidden_act, f"expected one of {family.hidden_acts}")
    rope = dict(hf_config.rope_parameters or {})
    if rope.get("rope_type", "default") != "default":
        raise _refuse(
            hf_dir, "rope_parameters.rope_type", rope.get("rope_type"), "only unscaled RoPE ('default') is built"
        )
    partial = rope.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None))
    if partial not in (None, 1, 1.0):
        raise _refuse(hf_dir, "partial_rotary_factor", partial, "RoPE on every channel (1.0) is built")
    context = seq_length or hf_config.max_position_embeddings
    window = getattr(hf_config, "sliding_window", None)
    if window is not None and window < context:
        raise _refuse(
            hf_dir,
            "sliding_window",
            window,
            f"shorter than the context {context} (attention is over the whole context); "
            f"import with --seq-length {window} or less",
        )
    bias = _linear_bias(hf_config, family, hf_dir)
    heads = hf_config.num_attention_heads
    return ModelConfig(
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_attention_heads=heads,
        ffn_hidden_size=hf_config.intermediate_size,
        num_query_groups=hf_config.num_key_value_heads or heads,
        kv_channels=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
        vocab_size=hf_config.vocab_size,
        seq_length=context,
        activation=family.activation,
        tie_embeddings=bool(hf_config.tie_word_embeddings),
        rope_base=float(rope.get("rope_theta", 10000.0)),
        init_std=float(hf_config.initializer_range),
        layernorm_epsilon=float(getattr(hf_config, family.epsilon_field)),
        ffn=FFNConfig(),
        normalization=family.normalization,
        linear_bias=bias,
    )


def _linear_bias(hf_config, family: Family, hf_dir: Path | str) -> bool:
    """One switch for every linear's bias: what megatron's ``add_bias_linear`` can express."""
    if family is STARCODER2:
        return bool(hf_config.use_bias)
    if family is MISTRAL:
        return False
    attention, mlp = bool(hf_config.attention_bias), bool(hf_config.mlp_bias)
    if attention != mlp:
        raise _refuse(
            hf_dir,
            "attention_bias",
            attention,
            f"with mlp_bias={mlp}: biases on the attention linears but not the FFN's (or the reverse) are not built",
        )
    return attention


def dropout_notes(hf_config) -> list[str]:
    """Dropout rates the import drops (our model trains without dropout; inference is unaffected)."""
    return [f"{n}={getattr(hf_config, n)}" for n in _DROPOUT_FIELDS if getattr(hf_config, n, 0)]


def export_family(model_cfg: ModelConfig) -> Family:
    """The transformers architecture that computes ``model_cfg`` exactly."""
    for family in (STARCODER2, LLAMA):
        if (model_cfg.normalization, model_cfg.activation) == (family.normalization, family.activation):
            return family
    raise UnsupportedConfigError(
        f"model.normalization={model_cfg.normalization!r} with model.activation={model_cfg.activation!r}: no "
        f"transformers architecture computes this without remote code (Starcoder2 is LayerNorm + gelu, "
        f"Llama is RMSNorm + swiglu)"
    )


def hf_config_for(model_cfg: ModelConfig, *, bos_token_id: int | None, eos_token_id: int | None):
    """The transformers config object of :func:`export_family` describing ``model_cfg``."""
    from transformers import LlamaConfig, Starcoder2Config

    family = export_family(model_cfg)
    common = dict(
        vocab_size=model_cfg.vocab_size,
        hidden_size=model_cfg.hidden_size,
        intermediate_size=model_cfg.ffn_hidden_size,
        num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_attention_heads,
        num_key_value_heads=model_cfg.num_query_groups,
        head_dim=model_cfg.kv_channels,
        max_position_embeddings=model_cfg.seq_length,
        initializer_range=model_cfg.init_std,
        rope_parameters={"rope_type": "default", "rope_theta": model_cfg.rope_base},
        tie_word_embeddings=model_cfg.tie_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        attention_dropout=0.0,
        architectures=[family.architecture],
    )
    if family is STARCODER2:
        return Starcoder2Config(
            **common,
            hidden_act="gelu_pytorch_tanh",
            norm_epsilon=model_cfg.layernorm_epsilon,
            sliding_window=None,
            use_bias=model_cfg.linear_bias,
            residual_dropout=0.0,
            embedding_dropout=0.0,
        )
    return LlamaConfig(
        **common,
        hidden_act="silu",
        rms_norm_eps=model_cfg.layernorm_epsilon,
        attention_bias=model_cfg.linear_bias,
        mlp_bias=model_cfg.linear_bias,
    )
