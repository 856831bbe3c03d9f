"""Typed configuration dataclasses."""

from .model import FFNConfig, ModelConfig

__all__ = ["FFNConfig", "ModelConfig"]
