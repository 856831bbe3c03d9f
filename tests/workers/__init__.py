"""Worker modules whose functions run inside torchrun processes launched by ``tests/mp_harness.py``."""
