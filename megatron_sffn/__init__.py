"""megatron-sffn: Megatron-style pretraining with structured feedforward layers."""

__version__ = "0.1.0"
