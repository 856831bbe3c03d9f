"""Pretraining data: corpus reading, tokenization, packing, the shard format and its manifest.

Modules are imported individually (``from megatron_sffn.data.manifest import
load_manifest``) so that preprocessing tools do not pay for torch imports.
"""
