"""Decayed causal linear attention in pure PyTorch (SUPRA's core): decays, chunked and recurrent forms.

Nothing here knows of tensor parallelism or megatron-core; the attention
module in ``megatron_sffn.model.supra_attention`` brings the heads here.
"""

from .decay import DECAYS, alibi_slopes, log_decays
from .ops import chunked_decay_attention, decay_attention, recurrent_decay_attention

__all__ = [
    "DECAYS",
    "alibi_slopes",
    "chunked_decay_attention",
    "decay_attention",
    "log_decays",
    "recurrent_decay_attention",
]
