"""Export a checkpoint as a Hugging Face ``transformers`` model directory.

    python -m megatron_sffn.export_hf runs/tiny --out hf/tiny                 # the run's latest checkpoint
    python -m megatron_sffn.export_hf runs/tiny --out hf/tiny --step 100 --dtype bf16

The directory loads with ``AutoModelForCausalLM.from_pretrained(DIR)`` and
``AutoTokenizer.from_pretrained(DIR)``, without remote code: the paper's
architecture (LayerNorm, GELU-tanh) becomes ``Starcoder2``, an RMSNorm +
SwiGLU model (an imported Llama or Mistral) becomes ``Llama``.  Structured
FFNs are written as their exact dense matrices (the maps are linear), so the
exported model computes what ours computes.  The checkpoint is read in this
one process whatever layout it was saved at (dist_checkpointing reshards).
Everything is written under a temporary name beside ``--out`` and renamed at
the end: a failed export leaves no directory named ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

import yaml

from .entry_setup import quiet_on_broken_pipe

DTYPES = ("fp32", "bf16", "fp16")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m megatron_sffn.export_hf", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (its latest checkpoint) or a checkpoint directory")
    parser.add_argument("--out", type=Path, required=True, help="the model directory to create (must not exist)")
    parser.add_argument("--step", type=int, help="export the checkpoint of this step instead of the latest")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="dtype of the saved weights (default fp32)")
    parser.add_argument(
        "--max-shard-gb", type=float, default=5.0, help="split the weights into files of at most this size (GB)"
    )
    return parser.parse_args(argv)


def _say(message: str) -> None:
    print(f"[export_hf] {message}", flush=True)


def read_saved_model(checkpoint: Path):
    """The model config and the tokenizer spec a checkpoint was saved with."""
    from .config.loading import from_dict
    from .config.model import ModelConfig
    from .training.checkpointing import CONFIG_FILE

    path = checkpoint / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the checkpoint carries no run configuration")
    saved = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if "model" not in saved:
        raise ValueError(f"{path}: no model section")
    return from_dict(ModelConfig, saved["model"], f"{path}:model"), (saved.get("data") or {}).get("tokenizer")


def export_checkpoint(
    source: Path, out: Path, *, step: int | None = None, dtype: str = "fp32", max_shard_bytes: int = 5 * 10**9
) -> Path:
    """Write ``out`` from ``source`` (a run or checkpoint directory); returns ``out``.

    Everything that can be checked without the weights is checked before they are loaded.
    """
    import torch

    from .atomic_io import new_directory_atomic
    from .hf.architectures import export_family, hf_config_for
    from .hf.local_model import single_process_model
    from .hf.safetensors_io import write_sharded
    from .hf.tokenizer_files import export_tokenizer, require_json_tokenizer
    from .hf.weights import export_tensors
    from .training.checkpointing import load_checkpoint, read_checkpoint_header, resolve_step_checkpoint

    if out.exists():
        raise FileExistsError(f"--out {out} already exists; choose a new directory or remove it first")
    if max_shard_bytes <= 0:
        raise ValueError(f"--max-shard-gb must be positive, got {max_shard_bytes} bytes")
    checkpoint = resolve_step_checkpoint(source, step)
    model_cfg, tokenizer_spec = read_saved_model(checkpoint)
    family = export_family(model_cfg)
    tokenizer = require_json_tokenizer(tokenizer_spec, str(checkpoint))
    read_checkpoint_header(checkpoint)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    start = time.monotonic()
    _say(f"loading {checkpoint} ({family.architecture}, {model_cfg.num_layers} layers, FFN {model_cfg.ffn.structure})")
    model = single_process_model(model_cfg)
    load_checkpoint(checkpoint, model=[model])
    _say(f"loaded in {time.monotonic() - start:.1f} s; writing {out} ({dtype})")
    with new_directory_atomic(out) as staging:
        special = export_tokenizer(tokenizer, staging, model_max_length=model_cfg.seq_length)
        hf_config = hf_config_for(model_cfg, bos_token_id=special.bos_id, eos_token_id=special.eos_id)
        hf_config.dtype = torch_dtype
        write_sharded(
            export_tensors(model, model_cfg, family),
            staging,
            dtype=torch_dtype,
            max_shard_bytes=max_shard_bytes,
            progress=_say,
        )
        hf_config.save_pretrained(str(staging))
        _generation_config(special).save_pretrained(str(staging))
    _say(f"exported {checkpoint} to {out} in {time.monotonic() - start:.1f} s")
    return out


def _generation_config(special):
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=special.bos_id, eos_token_id=special.eos_id)


@quiet_on_broken_pipe
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from .hf import run_command

    shard_bytes = int(args.max_shard_gb * 10**9)
    return run_command(
        lambda: export_checkpoint(args.run_dir, args.out, step=args.step, dtype=args.dtype, max_shard_bytes=shard_bytes)
    )


if __name__ == "__main__":
    sys.exit(main())
