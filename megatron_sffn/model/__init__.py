"""megatron-core GPTModel in the paper's architecture, with per-layer structured FFNs."""

from .builder import build_gpt_model
from .distributed import initialize_model_parallel, seed_model_parallel
from .transformer_config import transformer_config

__all__ = ["build_gpt_model", "initialize_model_parallel", "seed_model_parallel", "transformer_config"]
