"""Typed description of a model: the one object that the builder, the FLOP
accounting and the trainer all read, so that what is counted is what is built."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..linear_attention.decay import DECAYS as SUPRA_DECAYS
from ..structured import counts

ACTIVATIONS = ("gelu", "swiglu")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
ATTENTIONS = ("softmax", "supra")


@dataclass
class FFNConfig:
    """Which structure the feedforward layers use and its sizes.

    ``dense_layers`` lists the (0-based) layers whose FFN stays dense; the paper
    keeps layer 0 dense.  ``init`` None means the structure's paper default
    (normal for dense, svd for lowrank, ortho for block structures).
    ``rank`` / ``blocks`` apply to the structures defined by them (rank:
    lowrank, blockdense; blocks: blockdense, blockshuffle) and are dropped for
    the others.  ``tp_strategy`` picks how structured factors split over tensor-parallel
    ranks (``docs/tensor-parallel.md``); ``"auto"`` takes the cheapest plan
    whose communication does not exceed a dense FFN's.
    """

    structure: str = "dense"
    rank: int | None = None
    blocks: int | None = None
    dense_layers: list[int] = field(default_factory=lambda: [0])
    init: str | None = None
    tp_strategy: str = "auto"

    def __post_init__(self) -> None:
        # Sizes the structure does not use are dropped: a config whose base is a LowRank model, overridden to
        # structure=dense (or blockshuffle), must not carry the base's rank into reports and checkpoint matching.
        for size in counts.SIZE_OPTIONS:
            if size not in counts.STRUCTURE_SIZES.get(self.structure, counts.SIZE_OPTIONS):
                setattr(self, size, None)

    def is_structured(self, layer: int) -> bool:
        return self.structure != "dense" and layer not in self.dense_layers


@dataclass
class SupraConfig:
    """SUPRA linear attention ("Linearizing Large Language Models", Mercat et al., 2024).

    Used when ``model.attention`` is ``supra``.  ``decay`` picks the fixed
    per-head decay (``lightning``, the paper's, or ``retnet``);
    ``chunk_size`` is the chunk of the parallel training form (64 in the
    reference kernel).  Which layers are linear: all (both ``layers`` and
    ``every`` unset), the 0-based ``layers`` listed, or every ``every``-th
    layer (0-based layers ``every-1``, ``2*every-1``, ...); the others keep
    softmax attention (hybrids).
    """

    decay: str = "lightning"
    chunk_size: int = 64
    layers: list[int] | None = None
    every: int | None = None

    def __post_init__(self) -> None:
        if self.decay not in SUPRA_DECAYS:
            raise ValueError(f"supra.decay={self.decay!r}; expected one of {SUPRA_DECAYS}")
        if self.chunk_size < 1:
            raise ValueError(f"supra.chunk_size={self.chunk_size} must be positive")
        if self.layers is not None and self.every is not None:
            raise ValueError(f"set at most one of supra.layers={self.layers} and supra.every={self.every}")
        if self.every is not None and self.every < 1:
            raise ValueError(f"supra.every={self.every} must be positive")

    def is_linear(self, layer: int) -> bool:
        if self.layers is not None:
            return layer in self.layers
        return self.every is None or (layer + 1) % self.every == 0


@dataclass
class ModelConfig:
    """A GPT in the paper's architecture (pre-LN, biases, RoPE, tied embeddings, no dropout).

    ``normalization`` and ``linear_bias`` describe the variants of other model
    families (Llama and Mistral use RMSNorm and no biases, with SwiGLU and an
    untied output layer), so that imported checkpoints are represented
    exactly; the defaults are the paper's architecture.  ``layernorm_epsilon``
    is the epsilon of either norm.
    """

    hidden_size: int
    num_layers: int
    num_attention_heads: int
    ffn_hidden_size: int | None = None  # default 4 * hidden_size
    num_query_groups: int | None = None  # GQA key/value heads; None = num_attention_heads
    kv_channels: int | None = None  # head dim; default hidden_size // num_attention_heads
    vocab_size: int = 32000
    seq_length: int = 1024
    activation: str = "gelu"  # gelu uses the tanh approximation
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    init_std: float = 0.02
    layernorm_epsilon: float = 1e-5
    ffn: FFNConfig = field(default_factory=FFNConfig)
    # Architecture variants of other model families (see the class docstring).
    normalization: str = "LayerNorm"
    linear_bias: bool = True  # biases on the qkv, attention-output and FFN linears
    attention: str = "softmax"  # or "supra": linear attention in the layers model.supra selects
    supra: SupraConfig = field(default_factory=SupraConfig)

    def __post_init__(self) -> None:
        if isinstance(self.ffn, dict):
            self.ffn = FFNConfig(**self.ffn)
        if isinstance(self.supra, dict):
            self.supra = SupraConfig(**self.supra)
        self._validate_attention()
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; set kv_channels explicitly"
                )
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_query_groups={self.num_query_groups}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r}; expected one of {ACTIVATIONS}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization={self.normalization!r}; expected one of {NORMALIZATIONS}")
        bad = [i for i in self.ffn.dense_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"ffn.dense_layers={self.ffn.dense_layers} names layers outside 0..{self.num_layers - 1}")
        if self.ffn.structure != "dense":
            for n, m in self.ffn_shapes():
                counts.validate_structure(self.ffn.structure, n, m, self.ffn.rank, self.ffn.blocks)

    def _validate_attention(self) -> None:
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention={self.attention!r}; expected one of {ATTENTIONS}")
        bad = [i for i in self.supra.layers or [] if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"supra.layers={self.supra.layers} names layers outside 0..{self.num_layers - 1}")
        if self.attention == "supra" and not self.linear_attention_layers():
            raise ValueError(f"attention='supra' but model.supra selects none of the {self.num_layers} layers")

    def is_linear_attention(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` (0-based) uses SUPRA linear attention."""
        return self.attention == "supra" and self.supra.is_linear(layer)

    def linear_attention_layers(self) -> list[int]:
        return [layer for layer in range(self.num_layers) if self.is_linear_attention(layer)]

    @property
    def attention_width(self) -> int:
        """d_attn = heads * head_dim (may differ from hidden_size in wide-and-structured models)."""
        return self.num_attention_heads * self.kv_channels

    @property
    def kv_width(self) -> int:
        """d_kv = kv_heads * head_dim."""
        return self.num_query_groups * self.kv_channels

    def ffn_shapes(self, hidden: int | None = None) -> list[tuple[int, int]]:
        """(in, out) of fc1 and fc2; fc1 is twice as wide for SwiGLU (gate and value).

        ``hidden`` replaces ``ffn_hidden_size`` (an FFN computing only some hidden units).
        """
        f = self.ffn_hidden_size if hidden is None else hidden
        fc1_out = f * (2 if self.activation == "swiglu" else 1)
        return [(self.hidden_size, fc1_out), (f, self.hidden_size)]
