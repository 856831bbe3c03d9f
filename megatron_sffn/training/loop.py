"""The pretraining loop: set up a run, resume it, train, evaluate, checkpoint, stop cleanly.

One call of :func:`run_training` is one launch of a run.  A run spans any
number of launches: each starts from the run directory's latest complete
checkpoint (``checkpoint.resume``) and continues the same trajectory, because
everything that decides the next step is restored: weights, optimizer
moments, LR schedule position, data-stream position, RNG states and the
trainer's counters.  A launch ends when

* the run reaches its length (``training.train_steps`` or ``train_tokens``):
  final checkpoint and final evaluation;
* SIGTERM / SIGUSR1 / SIGINT (Ctrl-C) arrives on any rank
  (``checkpoint.save_on_signal``): all ranks agree on the step, save, and
  return (a second SIGINT exits at once, without saving);
* ``training.exit_after_steps`` steps of this launch are done: save and return;
* ``training.max_consecutive_nonfinite`` steps in a row had a NaN/Inf loss or
  gradient: :class:`~.nonfinite.NonFiniteTrainingError`, without saving the
  diverged state.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .. import cpu_compat
from ..config.train import TrainConfig
from ..entry_setup import missing_accelerators_note
from ..model import initialize_model_parallel, seed_model_parallel
from ..planning.checks import check_run_config
from ..planning.steps import est_plan, resolved_train_steps, run_sgt_steps
from .checkpoint_dirs import CheckpointDirs
from .checkpoint_parts import ModelWeights, OptimizerState, PlanState, RankRNG, Stateful
from .checkpointing import (
    CHECKPOINTS_SUBDIR,
    CONFIG_FILE,
    check_same_model,
    commit_checkpoint,
    restore_checkpoint,
    save_run_config,
    write_checkpoint,
)
from .data_setup import RunData, build_run_data, record_run_inputs
from .est import EvolvingSubnetworks
from .evaluation import EvalResult, evaluate
from .faults import FaultPlan
from .metrics import MetricsLogger
from .model_setup import Numerics, build_model, build_optimizer, install_schedule_hooks, wrap_data_parallel
from .nonfinite import record_step
from .norms import params_l2_norm
from .resume_checks import check_starting_point, starting_point
from .run_lock import RunLock
from .schedule import LRSchedule, resume_schedule
from .self_guided import GuidedDataReplay, build_guidance
from .signals import StopRequest
from .state import TrainProgress
from .step import to_device, train_step
from .trace import StepTrace, sample_digests, tokens_digest
from .uptraining import describe_new_weights, load_start_weights


def say(message: str) -> None:
    """Print once per job (global rank 0)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[train] {message}", flush=True)


@dataclass
class TrainOutcome:
    progress: TrainProgress
    stopped_by: str  # "completed", "already-complete", "exit_after_steps" or a signal name
    checkpoint: Path | None  # the checkpoint written last in this launch
    final_eval: EvalResult | None


def init_distributed(config: TrainConfig, on_gpu: bool) -> None:
    """Process groups for the run's layout: torchrun's world (or a single process) with the configured backend."""
    if not dist.is_initialized() and "WORLD_SIZE" in os.environ:
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(config.parallel.resolved_backend(on_gpu))
    initialize_model_parallel(config.parallel.tensor_parallel, config.parallel.pipeline_parallel)


class Trainer:
    """The state of one launch: process groups, model, optimizer, data, counters."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        check_run_config(config)  # the preflight's checks, repeated for callers that skip it
        check_starting_point(config)
        self.start = starting_point(config)
        self.on_gpu = torch.cuda.is_available()
        cpu_compat.enable_if_no_cuda()
        init_distributed(config, self.on_gpu)
        seed_model_parallel(config.training.seed)
        from megatron.core import parallel_state

        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        note = missing_accelerators_note()
        if note:
            say(note)
        self.num_micro_batches = config.num_micro_batches(self.world_size)
        self.train_steps = resolved_train_steps(config)
        self.run_dir = Path(config.run_dir)
        self.dirs = CheckpointDirs(self.run_dir / CHECKPOINTS_SUBDIR)
        if self.rank == 0:
            save_run_config(config, self.run_dir / CONFIG_FILE)
            record_run_inputs(config)  # raw-mode globs resolved once per run; every rank reads the list
            for stale in self.dirs.clean_stale():
                say(f"removed {stale.name}, left behind by an interrupted save")
        dist.barrier()

        numerics = Numerics.resolve(config, self.on_gpu)
        self.model = [wrap_data_parallel(build_model(config, numerics), numerics)]
        install_schedule_hooks(self.model)
        self.faults = FaultPlan(config.debug, self.model, self.rank)
        # Self-guided training's guides get their own DDP and optimizer, chained with the model's.
        self.guidance = build_guidance(
            config,
            self.model,
            build_optimizer(config, numerics, self.model),
            micro_batches=self.num_micro_batches,
            dp_rank=parallel_state.get_data_parallel_rank(),
        )
        self.subnetworks = EvolvingSubnetworks(est_plan(config), config.model, self.model)
        start = self.start
        self.lr_schedule = (
            resume_schedule(start.checkpoint, config) if start is not None and start.resuming else LRSchedule.of(config)
        )
        if self.lr_schedule != LRSchedule.of(config):
            say(f"training.schedule_on_resume=keep: following the checkpoint's schedule ({self.lr_schedule})")
        self.scheduler = self.guidance.bind_scheduler(self.lr_schedule.build(self.guidance.optimizer, config.optimizer))
        self.data: RunData = build_run_data(
            config,
            dp_rank=parallel_state.get_data_parallel_rank(),
            dp_size=parallel_state.get_data_parallel_world_size(),
            micro_batches_per_step=self.num_micro_batches,
        )
        sgt = run_sgt_steps(config)
        self.replay = GuidedDataReplay(self.data.train, sgt.base_steps) if sgt and sgt.extra_steps else None
        self.progress = TrainProgress()
        self.trace = StepTrace(self.rank, config.debug.step_trace)
        device = torch.device("cuda", torch.cuda.current_device()) if self.on_gpu else torch.device("cpu")
        self.metrics = MetricsLogger.from_config(
            config, world_size=self.world_size, device=device, enabled=self.rank == self.world_size - 1
        )
        self.last_checkpoint: Path | None = None

    # -- start -----------------------------------------------------------------

    def restore(self) -> None:
        """Resume from this run's latest checkpoint, else initialise weights from ``checkpoint.load``."""
        latest = self.dirs.latest()
        if self.start is not None and self.start.resuming:
            self._resume_from(latest)
            return
        if latest is not None:
            say(f"checkpoint.resume is false: ignoring {latest} and starting at step 0 (later saves replace it)")
        if self.start is not None:
            source = self.start.checkpoint
            swap = check_same_model(source, self.config, allow_attention_swap=True)
            with self.guidance.guides_hidden():  # guides start from the loaded structure, not from saved guides
                new = load_start_weights(source, model=self.model, current=self.config.model)
            self.guidance.reset_guides()
            self.guidance.optimizer.reload_model_params()  # bf16 runs: refresh the fp32 master copy from the weights
            say(f"initialised the weights from {source} (optimizer, schedule and data start fresh)")
            if swap:
                say(
                    "SUPRA uptraining: every softmax weight loaded; stage's "
                    f"{describe_new_weights(new)} start at torch's default Linear init"
                )

    def checkpoint_parts(self, where: str) -> dict[str, Stateful]:
        """The run's state by checkpoint key, in the order it is restored; ``where`` names the checkpoint.

        The training plans follow ``progress`` (they check themselves against
        its step, and self-guided training drops guides the checkpoint no
        longer has before the optimizer is asked for its state).
        """
        return {
            "progress": self.progress,
            "sgt": PlanState(self.guidance, self.progress, where),
            "est": PlanState(self.subnetworks, self.progress, where),
            "scheduler": self.scheduler,
            "data": self.data,
            "model": ModelWeights(self.model),
            "optimizer": OptimizerState(lambda: self.guidance.optimizer, self.model),
            "rng": RankRNG(),
        }

    def _resume_from(self, checkpoint: Path) -> None:
        parts = self.checkpoint_parts(str(checkpoint))
        header = restore_checkpoint(checkpoint, parts)
        rng_restored = parts["rng"].restored
        if not rng_restored:
            seed_model_parallel(self.config.training.seed + self.progress.step)
        say(
            f"resumed from {checkpoint} at step {self.progress.step} "
            f"({self.progress.consumed_tokens:,} tokens consumed)"
            + ("" if rng_restored else f"; layout changed from {header['layout']}, RNG streams re-seeded")
        )

    # -- one step ----------------------------------------------------------------

    def _step(self, batches, stop: StopRequest | None):
        step = self.progress.step + 1
        waited = time.perf_counter()
        micro_batches = [to_device(next(batches)) for _ in range(self.num_micro_batches)]
        waited = time.perf_counter() - waited
        self.guidance.begin_step(step)
        self.subnetworks.begin_step(step)
        self.scheduler.step(increment=1)
        learning_rate = self.guidance.optimizer.param_groups[0]["lr"]
        with self.faults.step(step):
            result = train_step(
                self.model,
                self.guidance.optimizer,
                micro_batches,
                seq_length=self.config.model.seq_length,
                micro_batch_size=self.config.training.micro_batch_size,
                stop_flag=stop.flag if stop is not None else 0.0,
                before_micro_batch=self.guidance.before_micro_batch,
                extra_grad_chunks=self.guidance.grad_chunks(),
            )
        p = self.progress
        p.step = step
        p.consumed_samples += self.config.training.global_batch_size
        p.consumed_tokens += self.config.tokens_per_step()
        reporting = step % self.config.logging.log_interval == 0 or step == self.train_steps
        params_norm = params_l2_norm(self.model) if reporting or self.trace.enabled else None
        if self.trace.enabled:
            self.trace.write(
                step=step,
                loss=result.loss,
                lr=learning_rate,
                grad_norm=result.grad_norm,
                params_norm=params_norm,
                skipped=result.nonfinite,
                tokens_sha256=tokens_digest(micro_batches),
                sample_sha256=sample_digests(micro_batches),
            )
        if result.nonfinite:
            say(f"step {step}: non-finite loss or gradient, update skipped")
        record_step(p, result.nonfinite, self.config.training.max_consecutive_nonfinite)
        self.metrics.train_step(
            step,
            loss=result.loss,
            learning_rate=learning_rate,
            consumed_tokens=p.consumed_tokens,
            skipped_steps=p.skipped_steps,
            grad_norm=result.grad_norm,
            params_norm=params_norm,
            data_seconds=waited,
            extra_scalars={**self.guidance.metrics(), **self.subnetworks.metrics()},
            flops_per_token=self.subnetworks.training_flops_per_token(),
        )
        if self.guidance.end_step(step):
            say(f"self-guided training: guides switched off after step {step} (alpha reached 0)")
        return result

    # -- periodic work -----------------------------------------------------------

    def evaluate(self) -> EvalResult:
        self.guidance.begin_evaluation(self.progress.step)
        self.subnetworks.begin_evaluation()
        with self.metrics.excluded():
            result = evaluate(
                self.model,
                self.data.validation,
                seq_length=self.config.model.seq_length,
                micro_batch_size=self.config.training.micro_batch_size,
                micro_batches_per_call=self.num_micro_batches,
                max_batches=self.config.eval.max_batches,
            )
        self.metrics.validation(self.progress.step, result.loss)
        if self.trace.enabled:
            self.trace.write(eval_step=self.progress.step, val_loss=result.loss, val_tokens=result.tokens)
        return result

    def save(self) -> Path:
        with self.metrics.excluded():
            step = self.progress.step
            written = write_checkpoint(
                self.dirs,
                self.checkpoint_parts(str(self.dirs.partial_path(step))),
                step=step,
                config=self.config,
                lr_schedule=self.lr_schedule,
            )
            self.faults.maybe_pause_in_save(step, written)
            path = commit_checkpoint(self.dirs, step, keep_last=self.config.checkpoint.keep_last)
        self.last_checkpoint = path
        say(f"saved checkpoint {path}")
        return path

    # -- the launch --------------------------------------------------------------

    def run(self) -> TrainOutcome:
        cfg = self.config
        if self.progress.step >= self.train_steps:
            say(f"the run is already complete ({self.progress.step}/{self.train_steps} steps); nothing to do")
            return TrainOutcome(self.progress, "already-complete", None, None)
        say(
            f"training steps {self.progress.step + 1}..{self.train_steps} on {self.world_size} process(es): "
            f"TP={cfg.parallel.tensor_parallel} PP={cfg.parallel.pipeline_parallel} "
            f"DP={self.world_size // cfg.parallel.model_parallel_size}, "
            f"{self.num_micro_batches} micro-batch(es) of {cfg.training.micro_batch_size} per replica per step"
        )
        stop = StopRequest().install() if cfg.checkpoint.save_on_signal else None
        try:
            stopped_by = self._train_until_stop(stop)
            final_eval = self.evaluate() if stopped_by == "completed" and cfg.eval.at_end else None
        finally:
            if stop is not None:
                stop.uninstall()
            self.metrics.close()
        if stopped_by == "completed":
            say(f"training complete: {self.progress.step} steps, {self.progress.consumed_tokens:,} tokens")
        return TrainOutcome(self.progress, stopped_by, self.last_checkpoint, final_eval)

    def _train_until_stop(self, stop: StopRequest | None) -> str:
        cfg = self.config
        batches = iter(self.data.train)
        self.metrics.start(self.progress.step, self.progress.consumed_tokens)
        steps_this_launch = 0
        while True:
            if self.replay is not None and self.replay.due(self.progress.step + 1):
                batches = self._replay_guided_phase(batches)
            result = self._step(batches, stop)
            steps_this_launch += 1
            step = self.progress.step
            finished = step >= self.train_steps
            if cfg.eval.interval and step % cfg.eval.interval == 0 and not (finished and cfg.eval.at_end):
                self.evaluate()
            exit_now = cfg.training.exit_after_steps is not None and steps_this_launch >= cfg.training.exit_after_steps
            periodic = cfg.checkpoint.save_interval is not None and step % cfg.checkpoint.save_interval == 0
            if finished or periodic or result.stop_requested or exit_now:
                self.save()
            if finished:
                return "completed"
            if result.stop_requested:
                reason = stop.received.name if stop is not None and stop.received is not None else "signal"
                say(f"stopped by {reason} after step {step}; relaunch the same command to resume")
                return reason
            if exit_now:
                say(f"training.exit_after_steps={cfg.training.exit_after_steps} reached at step {step}")
                return "exit_after_steps"

    def _replay_guided_phase(self, batches):
        """Same-FLOPs SGT: rewind the data stream to the guided phase's first sample; returns the new iterator."""
        batches.close()  # stops the old iterator's loader workers
        self.replay.restart(self.data.train, self.data.state_dict())
        say(
            f"self-guided training: steps {self.progress.step + 1}..{self.train_steps} re-read the data of the "
            f"guided phase from its first sample"
        )
        return iter(self.data.train)


def run_training(config: TrainConfig) -> TrainOutcome:
    """One launch of the run described by ``config`` (call under torchrun or as a single process)."""
    # Global rank 0 holds the run directory for the whole launch, before anything in it changes.
    lock = RunLock(config.run_dir).acquire() if os.environ.get("RANK", "0") == "0" else None
    try:
        if lock is not None and lock.took_over:
            say(lock.took_over)
        trainer = Trainer(config)
        trainer.restore()
        return trainer.run()
    finally:
        if lock is not None:
            lock.release()
