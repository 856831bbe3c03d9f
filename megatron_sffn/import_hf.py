"""Import a Hugging Face ``transformers`` model (Starcoder2, Llama, Mistral) as a run directory.

    python -m megatron_sffn.import_hf path/to/hf_model --out runs/llama
    python -m megatron_sffn.import_hf path/to/mistral --out runs/mistral --seq-length 4096 --data data/prepared

The run directory holds ``config.yaml`` (the model section describes the
imported architecture exactly), ``tokenizer.json`` and a weights-only
``dist_checkpointing`` checkpoint at ``checkpoints/step_0000000`` that
``latest`` names.  ``evaluate`` and ``generate`` read it at any layout
(``data.path=...`` names the validation data when ``--data`` was not given);
a training run starts from it with ``checkpoint.load=RUN_DIR`` and the same
``model`` section (``base: RUN_DIR/config.yaml`` in its config).  A config
that our model cannot compute exactly is refused with the field at fault;
a checkpoint whose tensors do not match its config is refused with the
tensor and file.  Nothing is written under ``--out`` unless the import
completes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from .entry_setup import quiet_on_broken_pipe

# Tensors some checkpoints carry that hold no weights of the model (recomputed buffers).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m megatron_sffn.import_hf", description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_dir", type=Path, help="a local transformers model directory (config.json, safetensors)")
    parser.add_argument("--out", type=Path, required=True, help="the run directory to create (must not exist)")
    parser.add_argument(
        "--seq-length", type=int, help="context of the run (default: the model's max_position_embeddings)"
    )
    parser.add_argument("--data", help="data.path of the written config (a prepared dataset directory)")
    return parser.parse_args(argv)


def _say(message: str) -> None:
    print(f"[import_hf] {message}", flush=True)


def check_tensors(weights, expected: dict[str, tuple[int, ...]], tied: bool) -> None:
    """Every expected tensor present with its expected shape, nothing else; errors name tensor and file."""
    from .hf.architectures import CONFIG_JSON

    where = weights.hf_dir
    missing = [name for name in expected if name not in weights.names()]
    if missing:
        raise ValueError(f"{where}: the weights lack {len(missing)} tensor(s) the config implies, e.g. {missing[0]}")
    for name, shape in expected.items():
        found = weights.shape(name)
        if found != shape:
            raise ValueError(
                f"{weights.file_of(name)}: tensor {name} has shape {list(found)}, but {where / CONFIG_JSON} implies "
                f"{list(shape)}"
            )
    ignorable = ("lm_head.weight",) if tied else ()
    extra = [
        n for n in weights.names() if n not in expected and n not in ignorable and not n.endswith(_IGNORED_SUFFIXES)
    ]
    if extra:
        raise ValueError(
            f"{weights.file_of(extra[0])}: tensor {extra[0]} (and {len(extra) - 1} more) has no place in the model "
            f"{where / CONFIG_JSON} describes"
        )


def run_config(model_cfg, out: Path, data: str | None) -> dict:
    """The run directory's resolved config as a mapping (validated as a TrainConfig)."""
    from .config.loading import from_dict, to_dict
    from .config.train import TrainConfig
    from .hf.tokenizer_files import TOKENIZER_JSON

    data_section = {"path": data or "<data.path>", "tokenizer": str(out / TOKENIZER_JSON)}
    minimal = {
        "run_dir": str(out),
        "model": to_dict(model_cfg),
        "data": data_section,
        "training": {"micro_batch_size": 1, "global_batch_size": 1, "train_steps": 1},
    }
    resolved = to_dict(from_dict(TrainConfig, minimal, f"import of {out}"))
    resolved["data"]["path"] = data  # None until given: evaluate/train then need data.path=...
    return resolved


def import_model(hf_dir: Path, out: Path, *, seq_length: int | None = None, data: str | None = None) -> Path:
    """Write the run directory ``out`` from the transformers model in ``hf_dir``; returns ``out``."""
    from .atomic_io import new_directory_atomic
    from .config.loading import save_config
    from .hf.architectures import dropout_notes, family_of, load_hf_config, model_config_from_hf
    from .hf.local_model import single_process_model
    from .hf.safetensors_io import SafetensorsWeights
    from .hf.tokenizer_files import TOKENIZER_JSON, import_tokenizer
    from .hf.weights import expected_shapes, import_tensors
    from .training.checkpoint_dirs import CheckpointDirs
    from .training.checkpointing import CHECKPOINTS_SUBDIR, CONFIG_FILE, save_weights_checkpoint

    if out.exists():
        raise FileExistsError(f"--out {out} already exists; choose a new directory or remove it first")
    family = family_of(hf_dir)
    hf_config = load_hf_config(hf_dir)
    model_cfg = model_config_from_hf(hf_config, hf_dir, seq_length=seq_length)
    config = run_config(model_cfg, out, data)
    weights = SafetensorsWeights(hf_dir)
    start = time.monotonic()
    model = single_process_model(model_cfg)
    check_tensors(weights, expected_shapes(model, model_cfg, family), model_cfg.tie_embeddings)
    for note in dropout_notes(hf_config):
        _say(f"note: {note} is not carried over (this project's model has no dropout)")
    with new_directory_atomic(out) as staging:
        tokenizer = import_tokenizer(hf_dir, staging / TOKENIZER_JSON)
        if tokenizer.vocab_size > model_cfg.vocab_size:
            raise ValueError(
                f"{hf_dir}: the tokenizer has {tokenizer.vocab_size} tokens, more than vocab_size="
                f"{model_cfg.vocab_size} in {hf_dir / 'config.json'}"
            )
        _say(f"reading {family.architecture} weights from {hf_dir}")
        import_tensors(model, model_cfg, family, weights.get)
        save_weights_checkpoint(CheckpointDirs(staging / CHECKPOINTS_SUBDIR), config=config, model=[model])
        save_config(config, staging / CONFIG_FILE)
    _say(f"imported {hf_dir} into {out} in {time.monotonic() - start:.1f} s")
    return out


@quiet_on_broken_pipe
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from .hf import run_command

    return run_command(lambda: import_model(args.hf_dir, args.out, seq_length=args.seq_length, data=args.data))


if __name__ == "__main__":
    sys.exit(main())
