"""Hugging Face ``transformers`` interop: export our checkpoints, import Starcoder2 / Llama / Mistral.

transformers and safetensors are imported inside the functions that need
them, so the rest of the project runs without them.
"""

from __future__ import annotations

import sys
from typing import Callable

# What bad input raises (a missing file, an existing output, a config we refuse); anything else is a bug.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)


def run_command(action: Callable[[], object]) -> int:
    """Exit status of a command-line tool: 0, or 2 with the error on stderr when the input is at fault."""
    try:
        action()
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0
