"""Helpers shared by the trainer's tests: a synthetic prepared dataset, run configs, launching.

The dataset is written with the project's own shard writer and manifest
(the format the loader reads), filled with token sequences that follow a
learnable rule, so a few steps visibly lower the loss.  The trainer runs as
the user runs it: ``python -m megatron_sffn.train`` (one process) or
``torch.distributed.run`` (several gloo processes), each with a timeout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from megatron_sffn.data.manifest import TokenizerInfo
from tests.prepared_data import write_prepared

REPO_ROOT = Path(__file__).resolve().parents[2]
VOCAB = 128
SEQ = 16


def write_dataset(
    out: Path,
    *,
    train_samples: int = 192,
    val_samples: int = 40,
    per_shard: int = 32,
    seq: int = SEQ,
    vocab: int = VOCAB,
    seed: int = 0,
) -> Path:
    """A prepared dataset of arithmetic sequences ``t[i+1] = (t[i] + stride) mod vocab``."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split, count in (("train", train_samples), ("validation", val_samples)):
        start = rng.integers(0, vocab, size=(count, 1))
        stride = rng.integers(1, 4, size=(count, 1))
        splits[split] = ((start + stride * np.arange(seq + 1)) % vocab).astype(np.uint16)
    tokenizer = TokenizerInfo(spec="synthetic", type="hf-json", vocab_size=vocab, eos_id=0, sha256="0" * 64)
    write_prepared(
        out,
        splits,
        context_length=seq,
        per_shard=per_shard,
        tokenizer=tokenizer,
        settings={"synthetic": True, "seed": seed},
        created_by="tests/workers/train_checks.py",
    )
    return out


def write_text_corpus(
    out: Path, *, files: int = 2, documents: int = 60, bad_every: int = 9, seed: int = 0
) -> tuple[list[str], str]:
    """Raw JSONL files of random words with a lone surrogate (a bad document) every ``bad_every`` lines,
    and a word-level ``tokenizer.json`` whose ids fit the tiny model's vocabulary."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(VOCAB - 2)]
    paths = []
    for f in range(files):
        lines = []
        for d in range(documents):
            text = " ".join(words[j] for j in rng.integers(0, len(words), int(rng.integers(4, 40))))
            lines.append(json.dumps({"text": "\ud800" + text if d % bad_every == bad_every - 1 else text}))
        path = out / f"part-{f}.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        paths.append(str(path))
    return paths, word_level_tokenizer(words, out / "tokenizer.json")


def word_level_tokenizer(words: list[str], path: Path) -> str:
    """A ``tokenizer.json`` mapping each word to one id (EOS 0, unknown 1): instant and exact to tokenize."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path))
    return str(path)


def run_config(run_dir: Path, data_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A tiny run (4 layers, hidden 64, LowRank FFNs) as a plain mapping; ``sections`` update it."""
    config: dict[str, Any] = {
        "run_dir": str(run_dir),
        "model": {
            "hidden_size": 64,
            "num_layers": 4,
            "num_attention_heads": 4,
            "vocab_size": VOCAB,
            "seq_length": SEQ,
            "ffn": {"structure": "lowrank", "rank": 16},
        },
        "data": {"path": str(data_dir), "num_workers": 0, "seed": 7},
        "optimizer": {"lr": 3e-3, "warmup_steps": 2},
        "training": {"micro_batch_size": 2, "global_batch_size": 8, "train_steps": 6, "seed": 11},
        "checkpoint": {"save_interval": 100, "keep_last": 2},
        "logging": {"log_interval": 1, "tensorboard": False, "peak_tflops_per_device": 1.0},
        "eval": {"interval": None, "at_end": False},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def train_command(config_path: Path, nproc: int, overrides: list[str] = ()) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "megatron_sffn.train", str(config_path), *overrides]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "megatron_sffn.train",
        str(config_path),
        *overrides,
    ]


def train_env(trace_dir: Path | None = None, **faults: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.setdefault("OMP_NUM_THREADS", "1")
    for key in [k for k in env if k.startswith("SFFN_FAULT_") or k == "SFFN_STEP_TRACE"]:
        del env[key]
    if trace_dir is not None:
        env["SFFN_STEP_TRACE"] = str(trace_dir)
    env.update(faults)
    return env


def run_train(
    config_path: Path,
    *,
    nproc: int = 1,
    overrides: list[str] = (),
    env: dict[str, str] | None = None,
    timeout: float = 240.0,
) -> subprocess.CompletedProcess:
    """Run the trainer to completion (or failure) and return its exit code and output."""
    proc = subprocess.Popen(
        train_command(config_path, nproc, list(overrides)),
        cwd=REPO_ROOT,
        env=env or train_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"trainer timed out after {timeout:.0f} s:\n{out[-6000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, None)


def traced_run(
    tmp: Path, dataset: Path, name: str, *, nproc: int = 2, env_faults: dict | None = None, **sections: dict[str, Any]
) -> tuple[Path, str]:
    """Train :func:`run_config` updated by ``sections`` as run ``name`` under ``tmp``, tracing every step.

    Returns the trace directory and the output; fails the test on a non-zero exit.
    """
    run_dir, trace = tmp / name, tmp / f"{name}.trace"
    config = write_config(tmp / f"{name}.yaml", run_config(run_dir, dataset, **sections))
    done = run_train(config, nproc=nproc, env=train_env(trace, **(env_faults or {})))
    assert done.returncode == 0, f"exit code {done.returncode}:\n{done.stdout[-6000:]}"
    return trace, done.stdout


def trace_steps(trace: Path, rank: int = 0) -> dict[int, dict]:
    """The per-step records of one rank's trace, by step."""
    from megatron_sffn.training.trace import read_trace

    return {r["step"]: r for r in read_trace(trace / f"rank{rank}.jsonl") if "step" in r}
