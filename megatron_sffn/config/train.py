"""Typed description of a training run: everything ``python -m megatron_sffn.train`` reads.

Each section validates its own values in ``__post_init__``; ``TrainConfig``
then checks what only the whole run can know (the model against the parallel
layout, the batch against the sequence length).  Errors name the dotted key
and the offending value, so a bad launch fails before any process group or
weight exists.  The data-parallel size is only known at launch, which is why
the batch/world-size checks live in :meth:`TrainConfig.validate_layout`; the
checks that need the sharding plan, the FLOP accounting or the EST draws are
:func:`megatron_sffn.planning.checks.check_run_config`, run by the preflight.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Literal

from .est import ESTConfig
from .model import ModelConfig
from .sgt import SGTConfig

DEFAULT_WARMUP_FRACTION = 0.1


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _require_positive(**values: int | float | None) -> None:
    """Every named value that is set must be > 0; None means "not used" and passes."""
    for key, value in values.items():
        _require(value is None or value > 0, f"{key}={value!r} must be positive")


@dataclass
class DataConfig:
    """Where the training tokens come from.

    Exactly one source: ``path``, a prepared dataset directory (with its
    manifest.json), or ``raw``, parquet/JSONL files tokenized on the fly (which
    needs ``tokenizer``).  With ``path``, a given ``tokenizer`` is checked
    against the one recorded in the manifest, so a run cannot silently train on
    ids from a different vocabulary.
    """

    path: str | None = None
    raw: list[str] | None = None
    tokenizer: str | None = None
    seed: int = 1234
    num_workers: int = 1
    # mask and count a shard that fails to read; in raw mode leave out and count a file that cannot be
    # read (a remote one failing for good, a damaged parquet file) instead of stopping
    skip_bad_shards: bool = False
    # raw only: "error" stops at an unreadable document (naming file and row), "skip" leaves it out and counts it
    bad_documents: str = "error"
    # Loader options. The sample order depends on (seed, lanes) only; lanes must be a
    # multiple of data-parallel size x workers at every layout the run will ever use.
    lanes: int = 64
    shard_url_template: str | None = None  # e.g. "pipe:aws s3 cp s3://bucket/ds/{path} -"

    def __post_init__(self) -> None:
        _require(
            (self.path is None) != (self.raw is None),
            f"set exactly one of path (a prepared dataset directory) or raw (text files), "
            f"got path={self.path!r} raw={self.raw!r}",
        )
        _require(self.raw != [], "raw=[] lists no files")
        _require(
            self.raw is None or self.tokenizer is not None,
            f"raw={self.raw!r} is tokenized on the fly and needs tokenizer (a tokenizer.json path or a tiktoken name)",
        )
        _require(self.num_workers >= 0, f"num_workers={self.num_workers} must be >= 0")
        _require(self.bad_documents in ("error", "skip"), f"bad_documents={self.bad_documents!r} must be error or skip")
        _require_positive(lanes=self.lanes)
        _require(
            self.shard_url_template is None or "{path}" in self.shard_url_template,
            f"shard_url_template={self.shard_url_template!r} must contain {{path}} (a shard's path in the manifest)",
        )


@dataclass
class OptimizerConfig:
    """AdamW with warmup then decay to ``min_lr_ratio * lr`` (defaults: the paper's settings).

    Warmup is either a fraction of the training steps or an absolute count;
    with neither set it is 10% of the steps, as in the paper.
    """

    lr: float = 6e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # 0 disables clipping
    warmup_fraction: float | None = None
    warmup_steps: int | None = None
    decay_style: Literal["cosine", "linear", "constant"] = "cosine"

    def __post_init__(self) -> None:
        _require(
            self.warmup_fraction is None or self.warmup_steps is None,
            f"set at most one of warmup_fraction={self.warmup_fraction} and warmup_steps={self.warmup_steps} "
            f"(set the other to null)",
        )
        if self.warmup_fraction is None and self.warmup_steps is None:
            self.warmup_fraction = DEFAULT_WARMUP_FRACTION
        _require_positive(lr=self.lr, adam_eps=self.adam_eps)
        _require(0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        _require(self.weight_decay >= 0.0, f"weight_decay={self.weight_decay} must be >= 0")
        for key, beta in (("adam_beta1", self.adam_beta1), ("adam_beta2", self.adam_beta2)):
            _require(0.0 <= beta < 1.0, f"{key}={beta} must be in [0, 1)")
        _require(self.clip_grad >= 0.0, f"clip_grad={self.clip_grad} must be >= 0 (0 disables clipping)")
        if self.warmup_fraction is not None:
            _require(0.0 <= self.warmup_fraction < 1.0, f"warmup_fraction={self.warmup_fraction} must be in [0, 1)")
        if self.warmup_steps is not None:
            _require(self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} must be >= 0")

    def resolved_warmup_steps(self, train_steps: int) -> int:
        """Warmup length in steps for a run of ``train_steps`` (fractions round down)."""
        if self.warmup_steps is not None:
            return min(self.warmup_steps, train_steps)
        return int(self.warmup_fraction * train_steps)


@dataclass
class TrainingConfig:
    """Batch, length, numerics and recomputation of the run.

    Length is either ``train_steps`` or a token budget ``train_tokens``; a
    budget becomes the number of whole steps that fit in it (this reproduces
    the paper's step counts from its token budgets).
    """

    micro_batch_size: int
    global_batch_size: int
    train_steps: int | None = None
    train_tokens: int | None = None
    seed: int = 1234
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    recompute_granularity: Literal["full", "selective"] | None = None
    recompute_method: Literal["uniform", "block"] | None = None
    recompute_num_layers: int | None = None
    max_consecutive_nonfinite: int = 10
    exit_after_steps: int | None = None  # leave cleanly (with a checkpoint) after this many steps of this launch
    # A resume whose LR schedule (lr, min_lr_ratio, decay_style, warmup, length) differs from the checkpoint's is
    # refused unless this says what to do: "keep" the checkpoint's schedule (steps past its end run at its final
    # rate) or "refit" this run's schedule from the resumed step on (the rate jumps to the new curve).
    schedule_on_resume: Literal["keep", "refit"] | None = None

    def __post_init__(self) -> None:
        _require(
            (self.train_steps is None) != (self.train_tokens is None),
            f"set exactly one of train_steps or train_tokens, got train_steps={self.train_steps} "
            f"train_tokens={self.train_tokens}",
        )
        _require_positive(
            micro_batch_size=self.micro_batch_size,
            global_batch_size=self.global_batch_size,
            train_steps=self.train_steps,
            train_tokens=self.train_tokens,
            max_consecutive_nonfinite=self.max_consecutive_nonfinite,
            exit_after_steps=self.exit_after_steps,
            recompute_num_layers=self.recompute_num_layers,
        )
        _require(
            self.global_batch_size % self.micro_batch_size == 0,
            f"global_batch_size={self.global_batch_size} is not divisible by micro_batch_size={self.micro_batch_size}",
        )
        self._validate_recompute()

    def _validate_recompute(self) -> None:
        """The combinations megatron-core accepts, reported with our key names."""
        granularity, method, layers = self.recompute_granularity, self.recompute_method, self.recompute_num_layers
        if granularity is None:
            _require(
                method is None and layers is None,
                f"recompute_method={method!r} / recompute_num_layers={layers} need recompute_granularity "
                f"(full or selective)",
            )
        elif granularity == "full":
            _require(
                method is not None and layers is not None,
                f"recompute_granularity='full' needs recompute_method (uniform or block) and recompute_num_layers, "
                f"got recompute_method={method!r} recompute_num_layers={layers}",
            )
        else:
            _require(
                method is None and layers is None,
                f"recompute_granularity='selective' takes no recompute_method/recompute_num_layers, "
                f"got recompute_method={method!r} recompute_num_layers={layers}",
            )

    def resolved_precision(self, on_gpu: bool) -> Literal["bf16", "fp32"]:
        """``auto`` is bf16 autocast with fp32 master weights on GPU (the paper's setting), fp32 on CPU."""
        if self.precision == "auto":
            return "bf16" if on_gpu else "fp32"
        return self.precision


@dataclass
class ParallelConfig:
    """Model-parallel layout; data parallelism takes the rest of the world size."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    use_distributed_optimizer: bool | None = None  # None: on for GPU runs, off on CPU
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on GPU, gloo on CPU

    def __post_init__(self) -> None:
        _require_positive(tensor_parallel=self.tensor_parallel, pipeline_parallel=self.pipeline_parallel)

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel

    def resolved_backend(self, on_gpu: bool) -> Literal["nccl", "gloo"]:
        if self.backend == "auto":
            return "nccl" if on_gpu else "gloo"
        return self.backend

    def resolved_distributed_optimizer(self, on_gpu: bool) -> bool:
        """Auto keeps the sharded optimizer off on CPU, where its checkpoints need GPU-only fused Adam."""
        if self.use_distributed_optimizer is None:
            return on_gpu
        return self.use_distributed_optimizer


@dataclass
class CheckpointConfig:
    """When to save and what to start from.

    ``resume`` continues from the run directory's latest checkpoint when one
    exists; ``load`` names a checkpoint to start from when the run directory
    has none (e.g. a model trained at another layout).
    """

    save_interval: int | None = 1000  # None: save only at the end and on a signal
    keep_last: int | None = 3  # None keeps every checkpoint
    resume: bool = True
    load: str | None = None
    save_on_signal: bool = True  # SIGTERM / SIGUSR1 save then exit cleanly

    def __post_init__(self) -> None:
        _require_positive(save_interval=self.save_interval, keep_last=self.keep_last)


@dataclass
class LoggingConfig:
    log_interval: int = 10
    tensorboard: bool = True
    peak_tflops_per_device: float | None = None  # overrides the MFU denominator's lookup/measurement

    def __post_init__(self) -> None:
        _require_positive(log_interval=self.log_interval, peak_tflops_per_device=self.peak_tflops_per_device)


@dataclass
class EvalConfig:
    interval: int | None = 1000  # None: no periodic evaluation
    max_batches: int | None = None  # None: a full pass over the validation split
    at_end: bool = True

    def __post_init__(self) -> None:
        _require_positive(interval=self.interval, max_batches=self.max_batches)


@dataclass
class DebugConfig:
    """A per-step record for reproducibility checks, and deterministic faults for the recovery paths; all off.

    Recovery code (skipping a NaN step, saving on pre-emption, surviving a
    kill during a save) only runs when something goes wrong, so tests trigger
    it on purpose at an exact step instead of racing a timer.  The command line
    also sets these keys from environment variables (listed by ``python -m
    megatron_sffn.train --help``), so a test can drive an unmodified launch.
    Steps are 1-based.
    """

    # each rank appends one JSON line per step to <step_trace>/rank<global rank>.jsonl (see training/trace.py)
    step_trace: str | None = None
    nonfinite_steps: list[int] = field(default_factory=list)  # their loss is multiplied by NaN on the last stage
    # global rank 0 sends itself `signal` during this step; the other ranks learn of it through the step's reduction
    signal_at_step: int | None = None
    signal: str = "SIGTERM"
    # in this step's save every rank sleeps pause_in_save_s after writing, before the commit, announcing
    # "SAVE-PAUSED <dir>" on stderr, so that a test can kill the job mid-save
    pause_in_save_step: int | None = None
    pause_in_save_s: float = 0.0

    def __post_init__(self) -> None:
        _require_positive(signal_at_step=self.signal_at_step, pause_in_save_step=self.pause_in_save_step)
        _require(
            all(step > 0 for step in self.nonfinite_steps),
            f"nonfinite_steps={self.nonfinite_steps} must list positive steps",
        )
        _require(
            self.signal in signal.Signals.__members__,
            f"signal={self.signal!r}: unknown signal (expected a name such as SIGTERM or SIGUSR1)",
        )
        _require(self.pause_in_save_s >= 0.0, f"pause_in_save_s={self.pause_in_save_s} must be >= 0")


@dataclass
class TrainConfig:
    """One pretraining run; the resolved form is saved in ``run_dir`` on every start."""

    run_dir: str
    model: ModelConfig
    data: DataConfig
    training: TrainingConfig
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sgt: SGTConfig = field(default_factory=SGTConfig)
    est: ESTConfig = field(default_factory=ESTConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def __post_init__(self) -> None:
        _require(bool(self.run_dir), "run_dir is empty")
        self._validate_pipeline()
        self._validate_tensor_parallel()
        _require(
            self.resolved_base_steps() > 0,
            f"training.train_tokens={self.training.train_tokens} is less than one step of "
            f"{self.tokens_per_step()} tokens (training.global_batch_size={self.training.global_batch_size} x "
            f"model.seq_length={self.model.seq_length})",
        )
        self._validate_sgt()
        self._validate_est()

    def _validate_pipeline(self) -> None:
        model, pp = self.model, self.parallel.pipeline_parallel
        _require(
            model.num_layers % pp == 0,
            f"model.num_layers={model.num_layers} is not divisible by parallel.pipeline_parallel={pp}",
        )
        training = self.training
        if training.recompute_method == "block":
            per_stage = model.num_layers // pp
            _require(
                training.recompute_num_layers <= per_stage,
                f"training.recompute_num_layers={training.recompute_num_layers} exceeds the {per_stage} layers "
                f"per pipeline stage (model.num_layers={model.num_layers} / parallel.pipeline_parallel={pp})",
            )

    def _validate_tensor_parallel(self) -> None:
        """Every tensor split across TP ranks must split evenly.

        The structured FFN's own rules (whole blocks per rank, BlockShuffle's
        per-block widths, an explicit ``tp_strategy``) are the sharding code's,
        asked by :func:`megatron_sffn.planning.checks.check_run_config`.
        """
        model, tp = self.model, self.parallel.tensor_parallel
        sizes = {
            "model.num_attention_heads": model.num_attention_heads,
            "model.num_query_groups": model.num_query_groups,
            "model.ffn_hidden_size": model.ffn_hidden_size,
        }
        for key, value in sizes.items():
            _require(value % tp == 0, f"{key}={value} is not divisible by parallel.tensor_parallel={tp}")

    def _validate_sgt(self) -> None:
        """Self-guided training needs structured FFNs, and its per-micro-batch draws a forward run in order
        (whether its steps can be solved is the accounting's: :mod:`megatron_sffn.planning.checks`)."""
        if not self.sgt.enabled:
            return
        _require(
            self.model.ffn.structure != "dense",
            "sgt.enabled=true needs structured FFNs, but model.ffn.structure='dense'",
        )
        _require(
            not (self.sgt.stochastic and self.training.recompute_granularity == "full"),
            "sgt.stochastic=true cannot be combined with training.recompute_granularity='full': a recomputed layer "
            "would rerun its forward after later micro-batches changed its guide draw; set sgt.stochastic=false "
            "or recompute selectively",
        )

    def _validate_est(self) -> None:
        """Evolving subnetwork training: not combined with SGT, on softmax attention (whether its plan can be
        drawn at this layout is the EST package's: :mod:`megatron_sffn.planning.checks`)."""
        if not self.est.enabled:
            return
        _require(
            not self.sgt.enabled,
            "est.enabled=true cannot be combined with sgt.enabled=true (both change "
            "what each step computes); enable one of them",
        )
        _require(
            self.model.attention == "softmax",
            f"est.enabled=true needs model.attention=softmax, got "
            f"{self.model.attention!r}: subnetworks of SUPRA's linear attention are not defined",
        )

    def tokens_per_step(self) -> int:
        return self.training.global_batch_size * self.model.seq_length

    def resolved_base_steps(self) -> int:
        """The run's own length: ``train_steps``, or the whole steps that fit in ``train_tokens``."""
        if self.training.train_steps is not None:
            return self.training.train_steps
        return self.training.train_tokens // self.tokens_per_step()

    def data_parallel_size(self, world_size: int) -> int:
        """Data-parallel replicas at ``world_size`` processes; raises if the layout does not divide it."""
        mp = self.parallel.model_parallel_size
        _require(
            world_size > 0 and world_size % mp == 0,
            f"world size {world_size} is not divisible by parallel.tensor_parallel={self.parallel.tensor_parallel} "
            f"x parallel.pipeline_parallel={self.parallel.pipeline_parallel} = {mp}",
        )
        return world_size // mp

    def validate_layout(self, world_size: int) -> None:
        """Checks that need the launch's world size.

        The global batch must split into whole micro-batches per replica, and
        every data reader (replica x loader worker) must own whole lanes.
        """
        dp = self.data_parallel_size(world_size)
        training = self.training
        per_step = training.micro_batch_size * dp
        _require(
            training.global_batch_size % per_step == 0,
            f"training.global_batch_size={training.global_batch_size} is not divisible by "
            f"training.micro_batch_size={training.micro_batch_size} x data-parallel size {dp} = {per_step} "
            f"(world size {world_size})",
        )
        readers = dp * max(self.data.num_workers, 1)
        _require(
            self.data.lanes % readers == 0,
            f"data.lanes={self.data.lanes} is not a multiple of data-parallel size {dp} x "
            f"data.num_workers={self.data.num_workers} = {readers} (world size {world_size})",
        )

    def num_micro_batches(self, world_size: int) -> int:
        """Gradient-accumulation micro-batches per replica per step."""
        self.validate_layout(world_size)
        return self.training.global_batch_size // (self.training.micro_batch_size * self.data_parallel_size(world_size))
