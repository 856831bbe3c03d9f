"""Start a SUPRA model from a softmax checkpoint ("Linearizing Large Language Models", Mercat et al., 2024).

Every weight of the softmax model must load: embeddings, norms, FFNs, and
each attention's ``linear_qkv`` / ``linear_proj``, which SUPRA layers keep.
The only weights allowed to be absent from the checkpoint are those SUPRA
adds (its feature maps), which keep the PyTorch-default Linear init they were
built with, as in the paper.  Anything else missing or left over is an
error, so a partial load can never pass silently.

A softmax checkpoint of identical layers keys each weight once for all
layers (megatron's stacked form) while a hybrid SUPRA model keys its layers
separately; the request is therefore described in the checkpoint's keying.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from pathlib import Path
from typing import Iterator

from ..config.model import ModelConfig
from ..model.supra_attention import new_submodule_prefixes
from ..model.transformer_config import layers_differ
from .checkpoint_parts import sharded_model_state
from .checkpointing import is_attention_swap, load_checkpoint, read_checkpoint_header, saved_model_config


@contextlib.contextmanager
def _keyed_like(model, saved: ModelConfig) -> Iterator[None]:
    """Describe the model's shards with the checkpoint's per-layer or stacked keys."""
    config = model.config
    before = config.hetereogenous_dist_checkpoint
    config.hetereogenous_dist_checkpoint = layers_differ(saved)
    try:
        yield
    finally:
        config.hetereogenous_dist_checkpoint = before


def load_softmax_into_supra(path: Path, *, model: list, saved: ModelConfig) -> list[str]:
    """Collective: load a softmax checkpoint's weights into a SUPRA model; returns the new weights' names."""
    from megatron.core import dist_checkpointing
    from megatron.core.utils import unwrap_model

    read_checkpoint_header(path)
    module = unwrap_model(model[0])
    prefixes = tuple(new_submodule_prefixes(module))
    with _keyed_like(module, saved):
        state = sharded_model_state(model)
    new = sorted(k for k in state if k.startswith(prefixes))
    loaded = dist_checkpointing.load({"model": {k: v for k, v in state.items() if k not in new}}, str(path))
    result = module.load_state_dict(loaded["model"], strict=False)
    if set(result.missing_keys) - set(new) or result.unexpected_keys:
        raise ValueError(
            f"{path}: loading a softmax checkpoint into SUPRA left {sorted(set(result.missing_keys) - set(new))} "
            f"unloaded and {sorted(result.unexpected_keys)} unexpected; only SUPRA's feature maps may be new"
        )
    return [k for k in new if not k.endswith("_extra_state")]


def load_start_weights(path: Path, *, model: list, current: ModelConfig) -> list[str]:
    """Collective: the weights of ``path`` (not its optimizer or progress) into ``model``.

    Returns the names of the weights the checkpoint could not provide: SUPRA's
    new ones when a softmax checkpoint starts a SUPRA model, none otherwise.
    The caller has checked the architectures with ``check_same_model``.
    """
    saved = saved_model_config(path)
    if is_attention_swap(saved, current):
        return load_softmax_into_supra(path, model=model, saved=saved)
    load_checkpoint(path, model=model)
    return []


def describe_new_weights(names: list[str]) -> str:
    """``feature_map.weight in layers 0, 1 (local)``-style summary of the new weights of this stage."""
    layers: dict[str, list[str]] = defaultdict(list)
    for name in names:
        head, _, tail = name.partition(".self_attention.")
        layers[tail].append(head.rsplit(".", 1)[-1])
    parts = [f"{tail} in local layers {', '.join(idx)}" for tail, idx in sorted(layers.items())]
    return f"{len(names)} new tensors ({'; '.join(parts)})"
