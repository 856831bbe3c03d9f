"""Validation perplexity of a saved checkpoint, at any parallel layout.

    python -m megatron_sffn.evaluate runs/tiny                       # the run's latest checkpoint
    python -m megatron_sffn.evaluate runs/tiny/checkpoints/step_0000100 eval.max_batches=null
    torchrun --nproc_per_node 2 -m megatron_sffn.evaluate CKPT parallel.tensor_parallel=2 --json out.json

The run configuration comes from the checkpoint's own ``config.yaml``;
overrides change the layout (``parallel.*``), the data location
(``data.path``) or the amount evaluated (``eval.max_batches``; null is a
full pass over the validation split).  ``model.attention=supra`` evaluates
a softmax checkpoint right after the swap to SUPRA attention (new weights
at their initialisation, drawn from ``training.seed``).  Only the weights are read, so the
checkpoint may have been saved at any other tensor/pipeline/data layout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from .config.loading import load_config
from .config.train import TrainConfig
from .entry_setup import missing_accelerators_note, quiet_known_warnings, quiet_on_broken_pipe


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m megatron_sffn.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its latest checkpoint)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the saved run config")
    parser.add_argument("--json", type=Path, help="also write the result to this JSON file (global rank 0)")
    return parser.parse_args(argv)


def evaluate_checkpoint(checkpoint: Path, config: TrainConfig) -> dict:
    """Collective: load the weights of ``checkpoint`` at ``config``'s layout and run the validation pass."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from . import cpu_compat
    from .model import seed_model_parallel
    from .training.checkpointing import read_checkpoint_header
    from .training.data_setup import build_validation
    from .training.evaluation import evaluate
    from .training.loop import init_distributed
    from .training.model_setup import Numerics, build_model
    from .training.state import TrainProgress
    from .training.uptraining import load_start_weights

    on_gpu = torch.cuda.is_available()
    cpu_compat.enable_if_no_cuda()
    init_distributed(config, on_gpu)
    note = missing_accelerators_note()
    if note and dist.get_rank() == 0:
        print(f"[evaluate] {note}", file=sys.stderr, flush=True)
    seed_model_parallel(config.training.seed)
    world_size = dist.get_world_size()
    micro_batches = config.num_micro_batches(world_size)
    model = [build_model(config, Numerics.resolve(config, on_gpu))]
    load_start_weights(checkpoint, model=model, current=config.model)
    header = read_checkpoint_header(checkpoint)
    progress = TrainProgress.from_state_dict(header["progress"])
    validation = build_validation(
        config,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        micro_batches_per_step=micro_batches,
    )
    result = evaluate(
        model,
        validation,
        seq_length=config.model.seq_length,
        micro_batch_size=config.training.micro_batch_size,
        micro_batches_per_call=micro_batches,
        max_batches=config.eval.max_batches,
    )
    return {
        "checkpoint": str(checkpoint),
        "step": progress.step,
        "consumed_tokens": progress.consumed_tokens,
        "val_loss": result.loss,
        "val_perplexity": result.perplexity,
        "val_tokens": result.tokens,
        "layout": {
            "world_size": world_size,
            "tensor_parallel": config.parallel.tensor_parallel,
            "pipeline_parallel": config.parallel.pipeline_parallel,
        },
        "saved_layout": header["layout"],
    }


@quiet_on_broken_pipe
def main(argv: Sequence[str] | None = None) -> int:
    quiet_known_warnings()
    args = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        from .planning.checks import check_run_config
        from .training.checkpointing import CONFIG_FILE, check_same_model, resolve_checkpoint
        from .training.data_setup import check_dataset

        checkpoint = resolve_checkpoint(args.checkpoint)
        config = load_config(TrainConfig, checkpoint / CONFIG_FILE, args.overrides)
        check_run_config(config)
        check_same_model(checkpoint, config, allow_attention_swap=True)
        config.validate_layout(world_size)
        check_dataset(config)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2

    import torch.distributed as dist

    from .training.checkpoint_dirs import write_text_atomic

    try:
        report = evaluate_checkpoint(checkpoint, config)
        if dist.get_rank() == 0:
            print(
                f"[evaluate] {checkpoint} (step {report['step']}): validation loss {report['val_loss']:.6f}, "
                f"perplexity {report['val_perplexity']:.4f} over {report['val_tokens']:,} tokens",
                flush=True,
            )
            if args.json is not None:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")
    finally:
        from .model.distributed import close_process_group

        close_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
