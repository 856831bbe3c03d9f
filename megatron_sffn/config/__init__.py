"""Typed configuration dataclasses."""

from .model import FFNConfig, ModelConfig, SupraConfig

__all__ = ["FFNConfig", "ModelConfig", "SupraConfig"]
