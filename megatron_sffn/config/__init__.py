"""Typed configuration dataclasses.

A leaf of the package: it imports neither the sharding code (``parallel/``)
nor the accounting (``accounting/``) nor EST, so that every layer can read a
config.  What needs them (a structured FFN's split over TP ranks, the SGT
steps, a drawable EST plan, the run length SGT lengthens) is in
:mod:`megatron_sffn.planning` (``checks``, ``steps``).
"""

from .model import FFNConfig, ModelConfig, SupraConfig

__all__ = ["FFNConfig", "ModelConfig", "SupraConfig"]
