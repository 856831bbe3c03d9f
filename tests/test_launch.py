"""The launch scripts run real torchrun jobs on CPU (gloo) and agree with each other.

One launch per scenario, on configs/tiny.yaml shrunk to 2-sequence micro-batches
and 6 steps, over a dataset built here with the data_tools command-line tools:

* ``launch/single_node.sh`` with NPROC=2: the reference run;
* two ``launch/multi_node.sh`` on localhost joined by a c10d rendezvous (a
  2-node job, one process each): the same per-step losses and token
  fingerprints as the reference;
* ``launch/single_node.sh`` with a worker SIGKILLed while a checkpoint is being
  written: torchrun restarts the group, the trainer resumes from the previous
  checkpoint, and every step ends with the reference's loss;
* ``launch/slurm.sbatch``: parses, renders for 2 nodes, and the rendered job
  builds the expected srun/torchrun command (stand-in ``srun``/``scontrol``/
  ``nvidia-smi`` on PATH, a stand-in Python that records the preflight and
  the torchrun command).

Per-step values come from the trainer's step trace (``SFFN_STEP_TRACE``),
which stores losses exactly.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from megatron_sffn.train import ENV_PAUSE_IN_SAVE, ENV_STEP_TRACE
from megatron_sffn.training.faults import SAVE_PAUSED_MARKER
from megatron_sffn.training.trace import read_trace

REPO_ROOT = Path(__file__).resolve().parents[1]
LAUNCH = REPO_ROOT / "launch"
PYTHON = sys.executable
TINY = REPO_ROOT / "configs" / "tiny.yaml"
TRAIN_STEPS = 6
SAVE_INTERVAL = 2
PAUSED_SAVE_STEP = 4  # the worker dies while step 4 is saved, so the restart resumes from step 2
PAUSE_S = 4
TOOL_TIMEOUT_S = 180
LAUNCH_TIMEOUT_S = 360


# -- a small dataset made with the project's own tools ---------------------------------------------

_SUBJECTS = ["the model", "a layer", "the optimizer", "each rank", "the loader", "a block", "the network"]
_VERBS = ["reads", "writes", "computes", "splits", "gathers", "predicts", "learns", "stores"]
_OBJECTS = ["the weights", "a batch", "the gradient", "low-rank factors", "the next token", "a checkpoint", "the loss"]
_TAILS = ["quickly", "in order", "on every step", "without error", "at the end", "twice", "again", "in parallel"]


@dataclass(frozen=True)
class Dataset:
    prepared: Path
    tokenizer: Path


def write_corpus(path: Path, documents: int = 300, seed: int = 0) -> Path:
    """JSONL documents of generated sentences: learnable text that needs no download."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(documents):
            sentences = []
            for _ in range(rng.randint(20, 60)):
                words = [rng.choice(part) for part in (_SUBJECTS, _VERBS, _OBJECTS, _TAILS)]
                sentences.append(" ".join(words).capitalize() + ".")
            fh.write(json.dumps({"text": " ".join(sentences)}) + "\n")
    return path


def _run_tool(args: list[str]) -> None:
    done = subprocess.run([PYTHON, "-m", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    assert done.returncode == 0, f"{args[0]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def build_dataset(root: Path, context_length: int) -> Dataset:
    """Corpus -> ``data_tools.train_tokenizer`` (512 tokens) -> ``data_tools.prepare``, as a user builds one."""
    corpus = write_corpus(root / "corpus.jsonl")
    tokenizer = root / "tokenizer.json"
    prepared = root / "prepared"
    _run_tool(["data_tools.train_tokenizer", str(corpus), "--vocab-size", "512", "--out", str(tokenizer), "--quiet"])
    _run_tool(
        [
            "data_tools.prepare",
            str(corpus),
            "--tokenizer",
            str(tokenizer),
            "--out",
            str(prepared),
            "--context-length",
            str(context_length),
            "--samples-per-shard",
            "32",
            "--validation-fraction",
            "0.1",
            "--workers",
            "1",
            "--quiet",
        ]
    )
    return Dataset(prepared, tokenizer)


def tiny_context_length() -> int:
    import yaml

    return yaml.safe_load(TINY.read_text(encoding="utf-8"))["model"]["seq_length"]


# -- launching -------------------------------------------------------------------------------------


def run_overrides(dataset: Dataset, run_dir: Path) -> list[str]:
    """configs/tiny.yaml with this dataset, 6 short steps, a checkpoint every 2, no evaluation."""
    return [
        f"data.path={dataset.prepared}",
        f"data.tokenizer={dataset.tokenizer}",
        f"run_dir={run_dir}",
        f"training.train_steps={TRAIN_STEPS}",
        "training.micro_batch_size=2",
        "training.global_batch_size=4",
        f"checkpoint.save_interval={SAVE_INTERVAL}",
        "eval.interval=null",
        "eval.at_end=false",
        "logging.tensorboard=false",
        "logging.log_interval=1",
        "logging.peak_tflops_per_device=1",
    ]


def launch_env(trace_dir: Path | None, **extra: str) -> dict[str, str]:
    """The caller's environment for a CPU launch with one thread per process.

    The thread count is fixed because the scripts' default gives each process
    cores / processes-per-node threads, which differs between the 1-node and
    the 2-node layout and would change the float summation order of a matmul.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("SFFN_FAULT_") and k != ENV_STEP_TRACE}
    env.update(CUDA_VISIBLE_DEVICES="", SFFN_PYTHON=PYTHON, OMP_NUM_THREADS="1")
    if trace_dir is not None:
        env[ENV_STEP_TRACE] = str(trace_dir)
    env.update(extra)
    return env


def start(script: str, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "w", encoding="utf-8") as out:
        return subprocess.Popen(
            ["bash", str(LAUNCH / script), *args],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def finish(proc: subprocess.Popen, log: Path, deadline: float) -> str:
    """Wait for a launch (killing its whole process group past the deadline); its exit must be clean."""
    try:
        proc.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"launch timed out:\n{log.read_text(errors='replace')[-6000:]}")
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, f"launch exited with {proc.returncode}:\n{text[-6000:]}"
    return text


def run_launch(script: str, args: list[str], env: dict[str, str], log: Path) -> str:
    return finish(start(script, args, env, log), log, time.monotonic() + LAUNCH_TIMEOUT_S)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def final_steps(trace_dir: Path) -> dict[int, dict[int, tuple[float, str]]]:
    """rank -> step -> (loss, tokens digest), the last record of each step (a restarted step overwrites)."""
    found = {}
    for path in sorted(trace_dir.glob("rank*.jsonl")):
        steps = {r["step"]: (r["loss"], r["tokens_sha256"]) for r in read_trace(path) if "step" in r}
        found[int(path.stem.removeprefix("rank"))] = steps
    return found


def worker_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """local rank -> pid of the trainer processes torchrun started."""
    workers = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            cmdline = " ".join(child.cmdline())
            if "megatron_sffn.train" in cmdline and "torch.distributed.run" not in cmdline:
                workers[int(child.environ()["LOCAL_RANK"])] = child.pid
        except (psutil.NoSuchProcess, KeyError):
            continue
    return workers


# -- scenarios -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Dataset:
    return build_dataset(tmp_path_factory.mktemp("launch_data"), tiny_context_length())


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> dict[int, dict[int, tuple[float, str]]]:
    """launch/single_node.sh with NPROC=2: DP=2, uninterrupted."""
    root = tmp_path_factory.mktemp("single_node")
    run_dir, trace = root / "run", root / "trace"
    text = run_launch(
        "single_node.sh",
        [str(TINY), *run_overrides(dataset, run_dir)],
        launch_env(trace, NPROC="2"),
        root / "launch.log",
    )
    assert "training complete: 6 steps" in text
    attempt_dirs = list((run_dir / "logs").glob("*/*/attempt_*"))
    assert [d.name for d in attempt_dirs] == ["attempt_0"], "an uninterrupted run has one attempt"
    for rank in ("0", "1"):  # torchrun's per-rank logs land in the run directory
        assert (attempt_dirs[0] / rank / "stderr.log").is_file()
    steps = final_steps(trace)
    assert sorted(steps) == [0, 1] and all(sorted(s) == list(range(1, TRAIN_STEPS + 1)) for s in steps.values())
    return steps


@pytest.mark.multiproc
@pytest.mark.slow
def test_single_node_two_processes_train(reference):
    losses = [reference[0][step][0] for step in range(1, TRAIN_STEPS + 1)]
    assert losses[-1] < losses[0], f"6 steps on a learnable corpus should lower the loss: {losses}"
    assert reference[0][1][1] != reference[1][1][1], "the two data-parallel ranks must read different sequences"


@pytest.mark.multiproc
@pytest.mark.slow
def test_two_nodes_by_c10d_rendezvous_match_single_node(dataset, reference, tmp_path):
    run_dir, trace = tmp_path / "run", tmp_path / "trace"
    env = launch_env(trace, NNODES="2", NPROC="1", HEAD="127.0.0.1", PORT=str(free_port()), RUN_ID="two-nodes")
    args = [str(TINY), *run_overrides(dataset, run_dir)]
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    nodes = [start("multi_node.sh", args, env, tmp_path / f"node{i}.log") for i in range(2)]
    try:
        texts = [finish(proc, tmp_path / f"node{i}.log", deadline) for i, proc in enumerate(nodes)]
    finally:
        for proc in nodes:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert any("training complete: 6 steps" in t for t in texts)
    assert all("--rdzv-backend c10d" in t and "--nnodes 2" in t for t in texts)
    assert len(list((run_dir / "logs" / "two-nodes").iterdir())) == 2, "one log directory per node"
    assert final_steps(trace) == reference


@pytest.mark.multiproc
@pytest.mark.slow
def test_killed_worker_is_restarted_and_resumes(dataset, reference, tmp_path):
    run_dir, trace, log = tmp_path / "run", tmp_path / "trace", tmp_path / "launch.log"
    env = launch_env(trace, NPROC="2", MAX_RESTARTS="2", **{ENV_PAUSE_IN_SAVE: f"{PAUSED_SAVE_STEP}:{PAUSE_S}"})
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    proc = start("single_node.sh", [str(TINY), *run_overrides(dataset, run_dir)], env, log)
    try:
        while SAVE_PAUSED_MARKER not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"the launch ended before the paused save:\n{log.read_text()[-6000:]}"
            assert time.monotonic() < deadline, "no paused save within the time limit"
            time.sleep(0.2)
        victim = worker_pids(proc)[1]
        os.kill(victim, signal.SIGKILL)
        text = finish(proc, log, deadline)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    attempts = sorted(d.name for d in (run_dir / "logs").glob("*/*/attempt_*"))
    assert attempts == ["attempt_0", "attempt_1"], f"expected exactly one restart, found {attempts}"
    assert re.search(rf"resumed from \S+step_{SAVE_INTERVAL:07d} at step {SAVE_INTERVAL}", text), text[-4000:]
    assert "training complete: 6 steps" in text
    assert not list((run_dir / "checkpoints").glob(".partial.*")), "the interrupted save must be cleaned up"
    assert final_steps(trace) == reference


# -- SLURM -----------------------------------------------------------------------------------------


def _stand_in(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body, encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_slurm_template_parses():
    done = subprocess.run(["bash", "-n", str(LAUNCH / "slurm.sbatch")], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_slurm_job_renders_for_two_nodes_and_builds_the_torchrun_command(tmp_path):
    job = tmp_path / "job.sbatch"
    run_dir = tmp_path / "run"
    job_args = [str(TINY), "training.train_steps=3", f"run_dir={run_dir}"]
    rendered = subprocess.run(
        [
            PYTHON,
            str(LAUNCH / "render_slurm.py"),
            "--nodes",
            "2",
            "--gpus-per-node",
            "4",
            "--partition",
            "debug",
            "--time",
            "00:30:00",
            *job_args,
            "--out",
            str(job),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert rendered.returncode == 0, rendered.stderr
    text = job.read_text(encoding="utf-8")
    assert subprocess.run(["bash", "-n", str(job)], timeout=30).returncode == 0
    lines = text.splitlines()
    directives = [line for line in lines if line.startswith("#SBATCH")]
    assert [d for d in directives if "--nodes=" in d] == ["#SBATCH --nodes=2"]
    assert {"#SBATCH --gpus-per-node=4", "#SBATCH --partition=debug", "#SBATCH --time=00:30:00"} <= set(directives)
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    assert max(i for i, line in enumerate(lines) if line.startswith("#SBATCH")) < first_command, (
        "sbatch ignores #SBATCH lines after the first command"
    )

    # Run the job as SLURM would on the first node, with stand-ins for the cluster's tools.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "record"
    _stand_in(bin_dir, "scontrol", '[ "$1 $2 $3" = "show hostnames gpu-[07-08]" ] && printf "gpu-07\\ngpu-08\\n"\n')
    _stand_in(bin_dir, "srun", f'echo "$@" > {record}.srun\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    _stand_in(bin_dir, "nvidia-smi", 'for i in 0 1 2 3; do echo "GPU $i: stand-in"; done\n')
    fake_python = bin_dir / "python"
    _stand_in(
        bin_dir,
        "python",
        (  # the preflight (it would need the dataset) answers with the run directory
            f'if [[ "$1" == *preflight.py ]]; then printf "%s\\n" "$@" > {record}.preflight; echo {run_dir}; echo "$5"; '
            f"exit 0; fi\n"
            f'printf "%s\\n" "$@" > {record}.argv\n'
            f"env > {record}.env\n"
        ),
    )
    env = {
        **{k: v for k, v in launch_env(None).items() if k != "OMP_NUM_THREADS"},  # the default is checked below
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SFFN_PYTHON": str(fake_python),
        "SLURM_JOB_NODELIST": "gpu-[07-08]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_ID": "4242",
    }
    ran = subprocess.run(["bash", str(job)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr

    srun_options = (tmp_path / "record.srun").read_text().split()[:3]
    assert srun_options == ["--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    argv = (tmp_path / "record.argv").read_text().splitlines()
    command = " ".join(argv)
    preflight = (tmp_path / "record.preflight").read_text().splitlines()
    assert preflight[1:] == ["--world-size", "8", "--job-id", "slurm-4242", *job_args], (
        "the preflight checks the whole job's world size, knowing the job it joins"
    )
    for expected in (
        "launch/run_torchrun.py",
        "--nnodes 2",
        "--nproc-per-node 4",
        "--rdzv-backend c10d",
        "--rdzv-endpoint gpu-07:29500",
        "--rdzv-id slurm-4242",
        "--max-restarts 3",
        "--tee 3",
        f"-m megatron_sffn.train {' '.join(job_args)}",
    ):
        assert expected in command, f"{expected!r} missing from {command}"
    log_dir = Path(argv[argv.index("--log-dir") + 1])
    assert log_dir.parent == run_dir / "logs" / "slurm-4242" and log_dir.is_dir()
    worker_env = dict(line.split("=", 1) for line in (tmp_path / "record.env").read_text().splitlines() if "=" in line)
    assert worker_env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert worker_env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert worker_env["OMP_NUM_THREADS"] == str(max(os.cpu_count() // 4, 1))


# -- refusals --------------------------------------------------------------------------------------


def test_bad_override_stops_before_torchrun(tmp_path):
    run_dir = tmp_path / "run"
    done = subprocess.run(
        ["bash", str(LAUNCH / "single_node.sh"), str(TINY), "training.trian_steps=3", f"run_dir={run_dir}"],
        cwd=REPO_ROOT,
        env=launch_env(None, NPROC="2"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "training.trian_steps" in done.stderr and "torch.distributed.run" not in done.stderr
    assert not run_dir.exists()


def test_user_environment_wins(tmp_path):
    """Defaults yield to the caller's values (checked through the stand-in Python of a dry run)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stand_in(bin_dir, "python", f'env > {tmp_path}/env\nprintf "%s\\n" "$@" > {tmp_path}/argv\n')
    env = launch_env(None, NPROC="3", OMP_NUM_THREADS="7", NCCL_DEBUG="INFO", SFFN_PYTHON=str(bin_dir / "python"))
    done = subprocess.run(
        ["bash", str(LAUNCH / "single_node.sh"), str(TINY), "--dry-run", "--device", "H100"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    seen = dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines() if "=" in line)
    assert (seen["OMP_NUM_THREADS"], seen["NCCL_DEBUG"], seen["CUDA_DEVICE_MAX_CONNECTIONS"]) == ("7", "INFO", "1")
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv[:6] == ["-m", "megatron_sffn.planning", "--world-size", "3", "--nproc-per-node", "3"]
    assert argv[6:] == [str(TINY), "--device", "H100"]
