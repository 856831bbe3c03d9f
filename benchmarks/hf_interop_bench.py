"""Time and peak memory of the Hugging Face export and import, for the paper's model shapes.

    python benchmarks/hf_interop_bench.py                       # s and xl (xl needs ~12 GB RAM, ~16 GB disk)
    python benchmarks/hf_interop_bench.py --shapes s --json out.json

For each shape (``configs/models/<shape>.yaml``, dense, random weights) a
weights checkpoint is written first (not timed); then each phase runs in a
fresh process, which reports its wall time (library imports excluded) and
peak resident memory (``ru_maxrss``, the interpreter and libraries included):

``load``      our checkpoint into the single-process model (the baseline of ``export``);
``export``    ``export_hf`` of that checkpoint (load + dense weights + safetensors + tokenizer);
``hf_load``   ``AutoModelForCausalLM.from_pretrained`` of the export (the baseline of ``import``);
``import``    ``import_hf`` of the export (safetensors + dist_checkpointing save).

Ratios compare each phase with its baseline measured in the same run, which
is what stays meaningful on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("load", "export", "hf_load", "import")
BASELINE = {"export": "load", "import": "hf_load"}
SHARD_BYTES = 2 * 10**9


def _model_config(shape: str):
    from megatron_sffn.config.loading import from_dict, load_yaml_mapping
    from megatron_sffn.config.model import ModelConfig

    path = ROOT / "configs" / "models" / f"{shape}.yaml"
    return from_dict(ModelConfig, load_yaml_mapping(path)["model"], str(path))


def _write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, 1000)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))


def make_checkpoint(shape: str, work: Path) -> None:
    """A run directory with a weights checkpoint of ``shape`` at its default (N(0, 0.02)) initialisation."""
    from megatron_sffn.config.loading import save_config
    from megatron_sffn.import_hf import run_config
    from megatron_sffn.model import build_gpt_model, initialize_model_parallel, seed_model_parallel
    from megatron_sffn.training.checkpoint_dirs import CheckpointDirs
    from megatron_sffn.training.checkpointing import CHECKPOINTS_SUBDIR, CONFIG_FILE, save_weights_checkpoint

    model_cfg = _model_config(shape)
    run = work / "run"
    run.mkdir(parents=True)
    config = run_config(model_cfg, run, None)
    _write_tokenizer(Path(config["data"]["tokenizer"]))
    initialize_model_parallel(1, 1)
    seed_model_parallel(1)
    model = build_gpt_model(model_cfg, backend="local")
    save_weights_checkpoint(CheckpointDirs(run / CHECKPOINTS_SUBDIR), config=config, model=[model])
    save_config(config, run / CONFIG_FILE)


def run_phase(phase: str, work: Path) -> None:
    if phase == "load":
        from megatron_sffn.export_hf import read_saved_model, resolve_source
        from megatron_sffn.hf.local_model import single_process_model
        from megatron_sffn.training.checkpointing import load_checkpoint

        checkpoint = resolve_source(work / "run", None)
        load_checkpoint(checkpoint, model=[single_process_model(read_saved_model(checkpoint)[0])])
    elif phase == "export":
        from megatron_sffn.export_hf import export_checkpoint

        export_checkpoint(work / "run", work / "hf", max_shard_bytes=SHARD_BYTES)
    elif phase == "hf_load":
        import torch
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(str(work / "hf"), dtype=torch.float32)
    elif phase == "import":
        from megatron_sffn.import_hf import import_model

        import_model(work / "hf", work / "imported")
    else:
        raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")


def _in_subprocess(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_shape(shape: str, work: Path) -> dict:
    print(f"[bench] {shape}: writing a random checkpoint", flush=True)
    _in_subprocess(["--make", shape, "--work", str(work)])
    results = {}
    for phase in PHASES:
        results[phase] = _in_subprocess(["--phase", phase, "--work", str(work)])
        print(
            f"[bench] {shape} {phase}: {results[phase]['seconds']:.1f} s, peak RSS "
            f"{results[phase]['peak_rss_gib']:.2f} GiB",
            flush=True,
        )
    for phase, baseline in BASELINE.items():
        results[phase]["time_vs_" + baseline] = results[phase]["seconds"] / results[baseline]["seconds"]
    files = [p for p in (work / "hf").iterdir() if p.suffix == ".safetensors"]
    results["export_gib"] = sum(p.stat().st_size for p in files) / 2**30
    results["export_files"] = len(files)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["s", "xl"])
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temporary one, removed after)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--make", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase or args.make:  # one measured step, in its own process; library imports are not timed
        import megatron.core  # noqa: F401
        import transformers  # noqa: F401

        import megatron_sffn.export_hf  # noqa: F401
        import megatron_sffn.import_hf  # noqa: F401

        start = time.monotonic()
        if args.make:
            make_checkpoint(args.make, args.work)
        else:
            run_phase(args.phase, args.work)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(json.dumps({"seconds": time.monotonic() - start, "peak_rss_gib": peak}))
        return 0
    results = {"loadavg_before": Path("/proc/loadavg").read_text().split()[:3]}
    scratch = args.work or Path(tempfile.mkdtemp(prefix="hf-interop-bench-"))
    try:
        for shape in args.shapes:
            work = scratch / shape
            results[shape] = measure_shape(shape, work)
            shutil.rmtree(work)
    finally:
        if args.work is None:
            shutil.rmtree(scratch, ignore_errors=True)
    results["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
