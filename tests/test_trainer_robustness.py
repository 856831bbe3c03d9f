"""What a hostile or hurried user does to a training run, and what the trainer must do about it.

Single-process checks (no torchrun): the run-directory lock and its stale
takeover, the preflight's checks of the checkpoint a launch starts from
(model shape, LR schedule) and that a refusal leaves the run directory as it
was, Ctrl-C handling, the warning filters, the launch scripts' ``--help``
and their preflight before torchrun.

Launches (``launch/single_node.sh``, two gloo workers), as a user runs them:

* SIGTERM to torchrun mid-run: the workers save at the end of the step and
  the script exits 0 with no traceback; meanwhile a second launch on the same
  run directory is refused by the preflight, naming the holder, without
  starting torchrun; afterwards, a relaunch of another model or another LR
  schedule is refused (exit 2) and changes nothing, and
  ``training.schedule_on_resume=keep`` continues the saved schedule;
* Ctrl-C twice during a save: the job exits at once (130), no traceback, no
  worker left running, ``latest`` untouched.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import psutil
import pytest

from megatron_sffn import train
from megatron_sffn.training import loop, run_lock
from megatron_sffn.training.run_lock import LOCK_FILE, LockHolder, RunDirLocked, RunLock, holder_of
from megatron_sffn.training.schedule import SCHEDULE_FILE, LRSchedule
from megatron_sffn.training.trace import read_trace
from tests.test_launch import LAUNCH, launch_env
from tests.workers.train_checks import REPO_ROOT, run_config, run_train, train_env, write_config, write_dataset

LAUNCH_TIMEOUT_S = 420


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), train_samples=64, val_samples=16)


def _never_called(*args, **kwargs):
    raise AssertionError("the training loop started although the launch must be refused")


# -- the run-directory lock ---------------------------------------------------------------------------


def _write_lock(run_dir: Path, holder: LockHolder, age_s: float = 0.0) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    path.write_text(json.dumps(holder.__dict__), encoding="utf-8")
    if age_s:
        then = time.time() - age_s
        os.utime(path, (then, then))
    return path


def _dead_process() -> tuple[int, float]:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(proc.pid).create_time()
    proc.wait()
    return proc.pid, started


def test_lock_is_exclusive_names_its_holder_and_is_released(tmp_path):
    with RunLock(tmp_path / "run") as first:
        assert holder_of(tmp_path / "run") is None or holder_of(tmp_path / "run") == first.me
        with pytest.raises(RunDirLocked) as refused:
            RunLock(tmp_path / "run").acquire()
        me = first.me
        message = str(refused.value)
        assert f"host {me.host}" in message and f"pid {me.pid}" in message and "started 20" in message
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    assert not list((tmp_path / "run").iterdir()), "no temporary files left behind"


def test_live_holders_are_respected(tmp_path):
    here = LockHolder.this_process()
    _write_lock(tmp_path / "a", LockHolder(here.host, os.getppid(), psutil.Process(os.getppid()).create_time()))
    with pytest.raises(RunDirLocked, match=f"pid {os.getppid()}"):
        RunLock(tmp_path / "a").acquire()
    _write_lock(tmp_path / "b", LockHolder("node-17", 4242, time.time()), age_s=60)  # recent heartbeat elsewhere
    with pytest.raises(RunDirLocked, match="host node-17, pid 4242"):
        RunLock(tmp_path / "b").acquire()
    assert holder_of(tmp_path / "b").host == "node-17"


@pytest.mark.parametrize("case", ["dead pid on this host", "silent remote host", "previous torchrun attempt"])
def test_stale_locks_are_taken_over(tmp_path, monkeypatch, case):
    here = LockHolder.this_process()
    if case == "dead pid on this host":
        pid, started = _dead_process()
        stale, expected = LockHolder(here.host, pid, started), f"process {pid} no longer exists"
        age = 0.0
    elif case == "silent remote host":
        stale, expected = LockHolder("node-17", 4242, time.time() - 9000), "no heartbeat from node-17"
        age = run_lock.STALE_AFTER_S + 60
    else:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
        stale, expected = LockHolder("node-17", 4242, time.time(), "job-7", 0), "attempt 0 of this torchrun job"
        age = 0.0
    _write_lock(tmp_path / "run", stale, age)
    assert holder_of(tmp_path / "run") is None
    with RunLock(tmp_path / "run") as lock:
        assert expected in lock.took_over
        assert LockHolder(**json.loads((tmp_path / "run" / LOCK_FILE).read_text())) == lock.me
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []


def test_a_node_joining_the_job_that_holds_the_lock_passes_its_preflight(tmp_path, monkeypatch):
    """Multi-node: rank 0 on another node may lock the run directory before this node's preflight runs."""
    _write_lock(tmp_path / "run", LockHolder("node-01", 4242, time.time(), "slurm-77", 0))
    assert holder_of(tmp_path / "run", job_id="slurm-77") is None
    assert holder_of(tmp_path / "run", job_id="slurm-78").host == "node-01"  # another job
    assert holder_of(tmp_path / "run").host == "node-01"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "slurm-77")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert holder_of(tmp_path / "run") is None  # a worker of that same attempt


def test_heartbeat_refreshes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    with RunLock(tmp_path / "run") as lock:
        then = time.time() - 1000
        os.utime(lock.path, (then, then))
        time.sleep(0.5)
        assert time.time() - lock.path.stat().st_mtime < 100


def test_preflight_refuses_a_locked_run_directory_and_deletes_nothing(tmp_path, dataset, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", run_config(run_dir, dataset))
    partial = run_dir / "checkpoints" / ".partial.step_0000004"
    partial.mkdir(parents=True)  # the holder's save in progress
    holder = LockHolder("node-03", 777, time.time())
    _write_lock(run_dir, holder)
    monkeypatch.setattr(loop, "run_training", _never_called)
    assert train.main([str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run directory") and "in use by another job (host node-03, pid 777" in err
    assert partial.is_dir() and sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE, "checkpoints"]


# -- the checkpoint a launch starts from, checked in the preflight ------------------------------------


def _fake_checkpoint(run_dir: Path, raw_config: dict, step: int) -> Path:
    """What the preflight reads of a checkpoint: its config.yaml, schedule record and markers (no tensors)."""
    from megatron_sffn.config.loading import from_dict, save_config
    from megatron_sffn.config.train import TrainConfig

    config = from_dict(TrainConfig, raw_config)
    ckpt = run_dir / "checkpoints" / f"step_{step:07d}"
    ckpt.mkdir(parents=True)
    (ckpt / "metadata.json").write_text("{}")
    save_config(config, ckpt / "config.yaml")
    LRSchedule.of(config).write(ckpt)
    (run_dir / "checkpoints" / "latest").write_text(ckpt.name + "\n")
    save_config(config, run_dir / "config.yaml")
    return ckpt


def _tree(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (["model.ffn.rank=8"], ["holds a different model", "model.ffn.rank: checkpoint 16, this run 8"]),
        (
            ["training.train_steps=9"],
            [
                "another learning-rate schedule",
                "train_steps: checkpoint 6, this run 9",
                "training.schedule_on_resume=keep",
                "training.schedule_on_resume=refit",
            ],
        ),
        (["optimizer.lr=0.01"], ["lr: checkpoint 0.003, this run 0.01", "at update 5"]),
    ],
)
def test_a_mismatching_resume_is_refused_in_the_preflight_and_changes_nothing(
    tmp_path, dataset, monkeypatch, capsys, overrides, fragments
):
    raw = run_config(tmp_path / "run", dataset)
    _fake_checkpoint(tmp_path / "run", raw, step=4)  # of a 6-step run
    before = _tree(tmp_path / "run")
    config = write_config(tmp_path / "run.yaml", raw)
    monkeypatch.setattr(loop, "run_training", _never_called)
    assert train.main([str(config), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, "one line"
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert _tree(tmp_path / "run") == before


def test_checkpoint_load_of_another_model_is_refused_in_the_preflight(tmp_path, dataset, monkeypatch, capsys):
    source = _fake_checkpoint(tmp_path / "source", run_config(tmp_path / "source", dataset), step=6)
    raw = run_config(tmp_path / "run", dataset, model={"hidden_size": 32, "num_attention_heads": 4})
    config = write_config(tmp_path / "run.yaml", {**raw, "checkpoint": {"load": str(source)}})
    monkeypatch.setattr(loop, "run_training", _never_called)
    assert train.main([str(config)]) == 2
    assert "model.hidden_size: checkpoint 64, this run 32" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_schedule_choices_on_resume(tmp_path, dataset):
    from megatron_sffn.config.loading import from_dict
    from megatron_sffn.config.train import TrainConfig
    from megatron_sffn.training.schedule import resume_schedule

    raw = run_config(tmp_path / "run", dataset)
    ckpt = _fake_checkpoint(tmp_path / "run", raw, step=6)
    saved = LRSchedule.saved_in(ckpt)
    longer = {**raw, "training": {**raw["training"], "train_steps": 9}}
    for choice, expected_steps in (("keep", 6), ("refit", 9)):
        config = from_dict(TrainConfig, {**longer, "training": {**longer["training"], "schedule_on_resume": choice}})
        assert resume_schedule(ckpt, config).train_steps == expected_steps
    assert resume_schedule(ckpt, from_dict(TrainConfig, raw)) == saved  # unchanged: no choice needed
    shorter = from_dict(TrainConfig, {**raw, "training": {**raw["training"], "train_steps": 4}})
    assert resume_schedule(ckpt, shorter).train_steps == 4  # already complete: nothing left to schedule
    # keep: past the checkpoint's end the rate stays at its minimum; by the cosine written out by hand
    assert saved.lr_of_update(7) == saved.lr_of_update(9) == pytest.approx(3e-4)
    assert saved.lr_of_update(4) == pytest.approx(3e-4 + 0.5 * 2.7e-3 * (1 + math.cos(math.pi * 2 / 4)))
    (ckpt / SCHEDULE_FILE).unlink()  # a checkpoint from before the record existed: derived from its config
    assert LRSchedule.saved_in(ckpt) == saved


# -- signals -------------------------------------------------------------------------------------------


def test_ctrl_c_requests_a_stop_and_a_second_one_exits_at_once():
    script = (
        "import os, signal, sys, time\n"
        "from megatron_sffn.training.signals import StopRequest\n"
        "stop = StopRequest().install()\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "assert stop.flag == 1.0 and stop.received == signal.SIGINT\n"
        "print('first handled', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(5)\n"
        "print('not reached')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=train_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 130, done.stderr
    assert done.stdout == "first handled\n"
    assert "Ctrl-C again to exit at once" in done.stderr and "second stop request (SIGINT): exiting now" in done.stderr
    assert "Traceback" not in done.stderr


# -- warnings ------------------------------------------------------------------------------------------


def test_known_harmless_warnings_are_filtered_narrowly():
    from megatron_sffn.entry_setup import missing_accelerators_note, quiet_known_warnings

    def emitted(message: str, category: type[Warning], module: str, backward_on_gpu: bool = False) -> bool:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_known_warnings(backward_on_gpu=backward_on_gpu)
            warnings.warn_explicit(message, category, "x.py", 1, module=module)
        return bool(caught)

    te = "Transformer Engine and Apex are not installed. Falling back to Torch optimizers."
    assert not emitted(te, UserWarning, "megatron.core.optimizer")
    assert not emitted(
        "full scope is deprecated. Use empty cuda_graph_scope to capture the whole layer.",
        UserWarning,
        "megatron.core.transformer.transformer_config",
    )
    assert not emitted(
        "`load_state_dict` is deprecated and will be removed in future versions. Please use `load`.",
        FutureWarning,
        "megatron.core.dist_checkpointing.strategies.torch",
    )
    assert not emitted(
        "`torch.distributed.reduce_scatter_tensor` is deprecated. Please use ...",
        FutureWarning,
        "torch.distributed.c10d_logger",
    )
    assert not emitted(
        "`torch.distributed.all_gather_into_tensor` is deprecated. Please use `torch.distributed.all_gather_single`",
        FutureWarning,
        "torch.distributed.c10d_logger",
    )
    advice = (
        "When using async grad allreduce it is recommended to set the environment variable "
        "CUDA_DEVICE_MAX_CONNECTIONS to 1 for maximum speedup"
    )
    layers = "megatron.core.tensor_parallel.layers"
    assert emitted(advice, UserWarning, layers, backward_on_gpu=True)  # training on GPUs keeps megatron's advice
    assert not emitted(advice, UserWarning, layers)  # forward-only commands and CPU runs: the variable means nothing
    assert emitted(te, UserWarning, "some_other_library")  # the same words from elsewhere still show
    assert emitted("a real problem", UserWarning, "megatron.core.optimizer")  # other megatron warnings still show
    note = missing_accelerators_note()
    assert note is None or "not installed" in note


@pytest.mark.parametrize("decorated", [True, False], ids=["decorated", "plain"])
def test_a_reader_that_leaves_ends_a_command_quietly(decorated):
    """``cmd | head``: the decorated ``main`` exits 1 without a traceback; a plain one shows the problem solved."""
    script = "\n".join(
        [
            "import sys",
            "from megatron_sffn.entry_setup import quiet_on_broken_pipe",
            "def main():",
            "    for _ in range(100_000):",
            "        print('x' * 100)",
            "    return 0",
            f"sys.exit({'quiet_on_broken_pipe(main)' if decorated else 'main'}())",
        ]
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    process.stdout.close()  # the reader leaves before the first line
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1
    assert ("BrokenPipeError" in stderr) is not decorated, stderr


# -- launch scripts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["single_node.sh", "multi_node.sh"])
def test_help_lists_every_environment_variable_the_script_reads(script):
    done = subprocess.run(
        ["bash", str(LAUNCH / script), "--help"], capture_output=True, text=True, timeout=30, env=launch_env(None)
    )
    assert done.returncode == 0, done.stderr
    sources = (LAUNCH / script).read_text() + (LAUNCH / "common.sh").read_text()
    read = set(re.findall(r"\$\{([A-Z][A-Z0-9_]+)(?::-|:\+|\}|##)", sources)) - {"SFFN_ARGS", "SFFN_DRY_RUN"}
    read -= set(re.findall(r"^\s*(?:export\s+)?([A-Z][A-Z0-9_]+)=(?!\"\$\{)", sources, flags=re.M))  # set, not read
    assert {"NPROC", "MAX_RESTARTS", "SHUTDOWN_TIMEOUT", "OMP_NUM_THREADS", "SFFN_PYTHON"} <= read
    missing = sorted(v for v in read if not re.search(rf"^\s*{v}\b", done.stdout, flags=re.M))
    assert not missing, f"--help does not list {missing}:\n{done.stdout}"
    assert "Exit status: 0 when training completed or stopped cleanly" in done.stdout


def test_a_layout_error_stops_the_launch_before_torchrun(tmp_path, dataset):
    """Only the world size reveals it; the preflight runs once, with the launch's world size."""
    config = write_config(tmp_path / "run.yaml", run_config(tmp_path / "run", dataset))
    done = subprocess.run(
        ["bash", str(LAUNCH / "single_node.sh"), str(config)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=launch_env(None, NPROC="3"),
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "data-parallel size 3" in done.stderr and "per-rank logs" not in done.stderr
    assert not (tmp_path / "run").exists()


# -- launches ----------------------------------------------------------------------------------------------


def _start(config: Path, env: dict[str, str], log: Path, *overrides: str) -> subprocess.Popen:
    with open(log, "w", encoding="utf-8") as out:
        return subprocess.Popen(
            ["bash", str(LAUNCH / "single_node.sh"), str(config), *overrides],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_for(predicate, proc: subprocess.Popen, log: Path, what: str) -> None:
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not predicate():
        assert proc.poll() is None, f"the launch ended before {what}:\n{log.read_text(errors='replace')[-6000:]}"
        assert time.monotonic() < deadline, f"no {what} within the time limit"
        time.sleep(0.2)


def _finish(proc: subprocess.Popen, log: Path, timeout: float = LAUNCH_TIMEOUT_S) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"launch did not end:\n{log.read_text(errors='replace')[-6000:]}")
    return log.read_text(errors="replace")


def _trained_steps(trace: Path) -> list[int]:
    path = trace / "rank0.jsonl"
    return [r["step"] for r in read_trace(path) if "step" in r] if path.exists() else []


def _workers_of(config: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "megatron_sffn.train" in cmdline and str(config) in cmdline:
            found.append(proc)
    return found


@pytest.mark.multiproc
@pytest.mark.slow
def test_sigterm_to_torchrun_saves_exits_zero_and_guards_the_run_directory(tmp_path, dataset, monkeypatch, capsys):
    run_dir, trace, log = tmp_path / "run", tmp_path / "trace", tmp_path / "launch.log"
    raw = run_config(
        run_dir,
        dataset,
        training={"train_steps": 5000},
        checkpoint={"save_interval": 10_000},
        logging={"log_interval": 1000},
    )
    config = write_config(tmp_path / "run.yaml", raw)
    proc = _start(config, launch_env(trace, NPROC="2"), log)
    try:
        _wait_for(lambda: len(_trained_steps(trace)) >= 3, proc, log, "step 3")
        # A second launch on the same run directory: refused by the preflight, before torchrun.
        second = subprocess.run(
            ["bash", str(LAUNCH / "single_node.sh"), str(config)],
            cwd=REPO_ROOT,
            env=launch_env(None, NPROC="2"),
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert second.returncode == 2, second.stderr
        assert f"in use by another job (host {socket.gethostname()}, pid " in second.stderr
        assert "per-rank logs" not in second.stderr
        os.kill(proc.pid, signal.SIGTERM)  # the launcher process: torchrun
        text = _finish(proc, log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, text[-6000:]
    assert "Traceback" not in text and "SignalException" not in text
    assert "Transformer Engine and Apex are not installed. Falling" not in text
    assert text.count("Transformer Engine and Apex not installed") == 1  # once, from rank 0
    last = _trained_steps(trace)[-1]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{last:07d}"
    assert f"[launch] SIGTERM: the workers saved {run_dir}/checkpoints/step_{last:07d}" in text
    assert not (run_dir / LOCK_FILE).exists()

    # Relaunches that do not fit the checkpoint: refused by the preflight, nothing in the run directory changes.
    before = _tree(run_dir)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(loop, "run_training", _never_called)
    for overrides, fragment in (
        (["model.ffn.rank=8"], "model.ffn.rank: checkpoint 16, this run 8"),
        ([f"training.train_steps={last + 2}"], "train_steps: checkpoint 5000, this run"),
    ):
        assert train.main([str(config), *overrides]) == 2
        assert fragment in capsys.readouterr().err
    assert _tree(run_dir) == before
    monkeypatch.delenv("WORLD_SIZE")

    # schedule_on_resume=keep: two more steps at the rates of the saved 5000-step schedule.
    done = run_train(
        config,
        overrides=[f"training.train_steps={last + 2}", "training.schedule_on_resume=keep"],
        env=train_env(tmp_path / "trace2"),
    )
    assert done.returncode == 0, done.stdout[-6000:]
    resumed = {r["step"]: r["lr"] for r in read_trace(tmp_path / "trace2" / "rank0.jsonl") if "step" in r}
    assert sorted(resumed) == [last + 1, last + 2]
    lr, low, warmup, steps = 3e-3, 3e-4, 2, 5000  # run_config's optimizer, by the cosine written out by hand
    for step, rate in resumed.items():
        progress = (step - warmup) / (steps - warmup)
        assert rate == pytest.approx(low + 0.5 * (lr - low) * (1 + math.cos(math.pi * progress)))
    record = run_dir / "checkpoints" / f"step_{last + 2:07d}" / SCHEDULE_FILE
    assert json.loads(record.read_text())["train_steps"] == 5000


@pytest.mark.multiproc
@pytest.mark.slow
def test_ctrl_c_twice_exits_at_once_without_tracebacks(tmp_path, dataset):
    run_dir, trace, log = tmp_path / "run", tmp_path / "trace", tmp_path / "launch.log"
    config = write_config(tmp_path / "run.yaml", run_config(run_dir, dataset, checkpoint={"save_interval": 2}))
    env = launch_env(trace, NPROC="2", SFFN_FAULT_PAUSE_IN_SAVE="2:300")
    proc = _start(config, env, log)
    try:
        _wait_for(lambda: "SAVE-PAUSED" in log.read_text(errors="replace"), proc, log, "the paused save")
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the foreground process group
        _wait_for(lambda: "received SIGINT" in log.read_text(errors="replace"), proc, log, "the first Ctrl-C")
        pressed = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        text = _finish(proc, log, timeout=120)
        assert time.monotonic() - pressed < 60, "the second Ctrl-C must not wait for the paused save"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, text[-6000:]
    assert "Traceback" not in text, text[-6000:]
    assert "second stop request" in text and "exiting now, without saving" in text
    assert "[launch] SIGINT: stopped before the workers finished a save" in text
    assert not _workers_of(config), "no worker may outlive the launch"
    checkpoints = run_dir / "checkpoints"
    assert not (checkpoints / "latest").exists() and (checkpoints / ".partial.step_0000002").is_dir()
