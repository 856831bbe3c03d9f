"""Hugging Face ``transformers`` interop: export our checkpoints, import Starcoder2 / Llama / Mistral.

transformers and safetensors are imported inside the functions that need
them, so the rest of the project runs without them.
"""
