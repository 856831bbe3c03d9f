"""Typed description of a model: the one object that the builder, the FLOP
accounting and the trainer all read, so that what is counted is what is built."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..structured import counts

ACTIVATIONS = ("gelu", "swiglu")


@dataclass
class FFNConfig:
    """Which structure the feedforward layers use and its sizes.

    ``dense_layers`` lists the (0-based) layers whose FFN stays dense; the paper
    keeps layer 0 dense.  ``init`` None means the structure's paper default
    (normal for dense, svd for lowrank, ortho for block structures).
    ``tp_strategy`` picks how structured factors split over tensor-parallel
    ranks (``docs/tensor-parallel.md``); ``"auto"`` takes the cheapest plan
    whose communication does not exceed a dense FFN's.
    """

    structure: str = "dense"
    rank: int | None = None
    blocks: int | None = None
    dense_layers: list[int] = field(default_factory=lambda: [0])
    init: str | None = None
    tp_strategy: str = "auto"

    def is_structured(self, layer: int) -> bool:
        return self.structure != "dense" and layer not in self.dense_layers


@dataclass
class ModelConfig:
    """A GPT in the paper's architecture (pre-LN, biases, RoPE, tied embeddings, no dropout)."""

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

    def __post_init__(self) -> None:
        if isinstance(self.ffn, dict):
            self.ffn = FFNConfig(**self.ffn)
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
        bad = [i for i in self.ffn.dense_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"ffn.dense_layers={self.ffn.dense_layers} names layers outside 0..{self.num_layers - 1}")
        if self.ffn.structure != "dense":
            for n, m in self.ffn_shapes():
                counts.validate_structure(self.ffn.structure, n, m, self.ffn.rank, self.ffn.blocks)

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
