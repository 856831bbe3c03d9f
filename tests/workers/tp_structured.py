"""Checks of the tensor-parallel structured FFN linears, run in torchrun workers (gloo).

Also the home of the small builders that the single-process tests share, so
that both build exactly the same MLPs.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_sffn.config import FFNConfig, ModelConfig
from megatron_sffn.parallel.comm import record_traffic
from megatron_sffn.parallel.grads import average_token_split_grads
from megatron_sffn.parallel.layout import TPLayout, shard_ranges, take_rows
from megatron_sffn.parallel.mlp_spec import mlp_spec
from megatron_sffn.parallel.plan import FFNShape, rank_cost
from tests.workers.blockshuffle_ffn import (  # noqa: F401  (checks of this module's launch)
    block_major_checkpoint_refused,
    blockshuffle_ffn_matches_spec,
    blockshuffle_subset_matches_spec,
)

HIDDEN, FFN_HIDDEN = 32, 128
SEED = 1234


@dataclass(frozen=True)
class Case:
    structure: str
    rank: int | None = None
    blocks: int | None = None
    strategy: str = "auto"
    gated: bool = False
    hidden: int = HIDDEN
    ffn_hidden: int = FFN_HIDDEN

    @property
    def name(self) -> str:
        sizes = "".join(f"-{k}{v}" for k, v in (("R", self.rank), ("B", self.blocks)) if v)
        width = "" if (self.hidden, self.ffn_hidden) == (HIDDEN, FFN_HIDDEN) else f"-d{self.hidden}-f{self.ffn_hidden}"
        return f"{self.structure}{sizes}-{self.strategy}{'-gated' if self.gated else ''}{width}"

    def shape(self) -> FFNShape:
        return FFNShape(self.structure, self.hidden, self.ffn_hidden, self.rank, self.blocks, self.gated)


# Every structure, every strategy of each, gated variants, R on both sides of d/2.
CASES = [
    Case("dense"),
    Case("dense", gated=True),
    Case("lowrank", rank=8),
    Case("lowrank", rank=8, strategy="split/replicated"),
    Case("lowrank", rank=8, strategy="replicated/token"),
    Case("lowrank", rank=8, strategy="replicated/replicated"),
    Case("lowrank", rank=24),
    Case("lowrank", rank=8, gated=True),
    Case("blockdense", rank=8, blocks=2),
    Case("blockdense", rank=8, blocks=2, strategy="split/reduce"),
    Case("blockdense", rank=8, blocks=2, strategy="replicated/token"),
    Case("blockdense", rank=24, blocks=4, strategy="replicated/reduce"),
    Case("blockdense", rank=8, blocks=2, gated=True),
    Case("blockshuffle", blocks=2),
    Case("blockshuffle", blocks=4),
    Case("blockshuffle", blocks=4, strategy="split/reduce"),
    Case("blockshuffle", blocks=4, gated=True),
    Case("blockshuffle", blocks=2, strategy="split/reduce", gated=True),
]


def transformer_config(case: Case, **overrides: Any):
    from megatron.core.transformer.transformer_config import TransformerConfig

    activation = F.silu if case.gated else functools.partial(F.gelu, approximate="tanh")
    options = dict(
        num_layers=1,
        hidden_size=case.hidden,
        ffn_hidden_size=case.ffn_hidden,
        num_attention_heads=2,
        use_cpu_initialization=True,
        add_bias_linear=True,
        bias_activation_fusion=False,
        gated_linear_unit=case.gated,
        activation_func=activation,
        init_method_std=0.02,
    )
    options.update(overrides)
    return TransformerConfig(**options)


def build_mlp(
    case: Case,
    tp_group: Any,
    seed: int = SEED,
    linears: tuple[type, type] | None = None,
    mlp_class: type | None = None,
    **config_overrides: Any,
):
    """megatron's MLP for ``case`` built from the spec factory, weights drawn from ``seed``.

    ``linears`` replaces the spec's fc1 and fc2 classes (same options), ``mlp_class`` the MLP's.
    """
    from megatron.core.transformer.spec_utils import build_module

    model_cfg = ModelConfig(
        hidden_size=case.hidden,
        num_layers=2,
        num_attention_heads=2,
        ffn_hidden_size=case.ffn_hidden,
        activation="swiglu" if case.gated else "gelu",
        ffn=FFNConfig(structure=case.structure, rank=case.rank, blocks=case.blocks),
    )
    spec = mlp_spec(model_cfg, 1, tp_strategy=case.strategy)
    if linears is not None:
        spec.submodules.linear_fc1.module, spec.submodules.linear_fc2.module = linears
    if mlp_class is not None:
        spec.module = mlp_class
    config = transformer_config(case, **config_overrides)
    torch.manual_seed(seed)
    return build_module(spec, config=config, ffn_hidden_size=case.ffn_hidden, tp_group=tp_group)


def full_tensor_slice(param: torch.Tensor, full: torch.Tensor, layout: TPLayout) -> torch.Tensor:
    """The part of ``full`` a rank holds for ``param``, read from megatron's TP attributes."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    axis, stride = param.partition_dim, param.partition_stride
    return take_rows(full, shard_ranges(full.shape[axis], layout, stride), axis)


def inputs(tokens: tuple[int, int], seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """An input ``[s, b, d]`` and a regression target, identical on every rank."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*tokens, HIDDEN, generator=generator)
    return x, torch.randn(*tokens, HIDDEN, generator=generator)


def run_mlp(mlp, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward and backward of a squared-error loss; returns (output with bias, loss, input gradient)."""
    x = x.clone().requires_grad_(True)
    out, bias = mlp(x)
    y = out + bias
    loss = (y - target).square().sum()
    loss.backward()
    return y.detach(), loss.detach(), x.grad


def measure(mlp, tokens: tuple[int, int]) -> dict[str, Fraction]:
    """Per-token FLOPs (FlopCounterMode) and traffic (recorded collectives) of one forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode

    x, target = inputs(tokens)
    x.requires_grad_(True)
    count = tokens[0] * tokens[1]
    with record_traffic() as log:
        with FlopCounterMode(display=False) as forward_flops:
            out, bias = mlp(x)
        with FlopCounterMode(display=False) as backward_flops:
            (out + bias - target).square().sum().backward()
    return {
        "forward_flops": Fraction(forward_flops.get_total_flops(), count),
        "backward_flops": Fraction(backward_flops.get_total_flops(), count),
        "forward_comm": sum((t.elements for t in log if t.direction == "forward"), Fraction(0)) / count,
        "backward_comm": sum((t.elements for t in log if t.direction == "backward"), Fraction(0)) / count,
        "params": sum(p.numel() for p in mlp.parameters()),
    }


def expected_cost(case: Case, mlp, tp: int) -> dict[str, Fraction]:
    strategy = None if case.structure == "dense" else mlp.linear_fc1.strategy
    cost = rank_cost(case.shape(), strategy, tp)
    return {k: getattr(cost, k) for k in ("forward_flops", "backward_flops", "forward_comm", "backward_comm", "params")}


# -- process groups -------------------------------------------------------------


def _init(tensor_parallel: int) -> None:
    from megatron.core import parallel_state

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel)


def _tp_group():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# -- checks ---------------------------------------------------------------------


@dataclass
class CaseResult:
    strategy: str
    errors: dict[str, float] = field(default_factory=dict)  # relative errors, TP=2 vs TP=1
    measured: dict[str, Fraction] = field(default_factory=dict)
    expected: dict[str, Fraction] = field(default_factory=dict)


def tp2_matches_tp1() -> dict[str, CaseResult]:
    """Every case: TP=2 vs TP=1 from one seed (output, loss, input gradient, every weight and gradient).

    The TP=1 MLP runs on each rank with a one-rank group.  Gradients of
    token-split weights are finished with megatron's own TP reduction
    (``finalize_model_grads``' step), or with ``average_token_split_grads`` for
    gated cases, the path for loops outside megatron.  Then FLOPs, traffic and
    parameters of one rank are measured on 16 tokens and returned next to the
    closed-form plan.
    """
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import _allreduce_non_tensor_model_parallel_grads

    _init(2)
    singles = [dist.new_group([r]) for r in range(dist.get_world_size())]
    single, group = singles[dist.get_rank()], _tp_group()
    layout = TPLayout(group.rank(), group.size())
    results = {}
    for case in CASES:
        reference = build_mlp(case, single)
        parallel = build_mlp(case, None)
        x, target = inputs((5, 3))  # 15 tokens: token-split paths pad
        y1, loss1, dx1 = run_mlp(reference, x, target)
        y2, loss2, dx2 = run_mlp(parallel, x, target)
        if case.gated:
            average_token_split_grads([parallel], group)
        else:
            parallel.ddp_config = DistributedDataParallelConfig()
            _allreduce_non_tensor_model_parallel_grads([parallel], parallel.config, group)
        result = CaseResult(strategy=str(getattr(parallel.linear_fc1, "strategy", "dense")))
        result.errors.update(
            output=_relative_error(y2, y1), loss=_relative_error(loss2, loss1), input_grad=_relative_error(dx2, dx1)
        )
        full = dict(reference.named_parameters())
        for name, param in parallel.named_parameters():
            result.errors[f"weight:{name}"] = _relative_error(
                param.detach(), full_tensor_slice(param, full[name].detach(), layout)
            )
            result.errors[f"grad:{name}"] = _relative_error(
                param.grad, full_tensor_slice(param, full[name].grad, layout)
            )
        parallel.zero_grad()
        result.measured = measure(parallel, (4, 4))
        result.expected = expected_cost(case, parallel, layout.size)
        if case.structure == "dense":  # megatron's own collectives do not pass through the recorder
            for key in ("forward_comm", "backward_comm"):
                del result.measured[key], result.expected[key]
        results[case.name] = result
    return results


RESHARD_CASES = [
    (Case("dense", gated=True), Case("dense", gated=True)),
    (Case("lowrank", rank=8), Case("lowrank", rank=8, strategy="replicated/replicated")),
    (Case("lowrank", rank=8, gated=True), Case("lowrank", rank=8, gated=True)),
    (Case("blockdense", rank=8, blocks=2), Case("blockdense", rank=8, blocks=2, strategy="replicated/reduce")),
    (Case("blockshuffle", blocks=4), Case("blockshuffle", blocks=4)),
    (Case("blockshuffle", blocks=4, gated=True), Case("blockshuffle", blocks=4, gated=True)),
]


def _sharded_state(mlp):
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

    return mlp.sharded_state_dict(prefix="mlp.", metadata=ensure_metadata_has_dp_cp_group(None))


def _save(mlp, directory: str) -> None:
    from megatron.core import dist_checkpointing

    if dist.get_rank() == 0:
        os.makedirs(directory)
    dist.barrier()
    dist_checkpointing.save(_sharded_state(mlp), directory)


def _load(mlp, directory: str) -> None:
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(_sharded_state(mlp), directory)
    mlp.load_state_dict({k.removeprefix("mlp."): v for k, v in state.items()})


def _output(mlp, x: torch.Tensor) -> torch.Tensor:
    out, bias = mlp(x)
    return out + bias


def _scratch() -> str:
    from tests.mp_harness import scratch_dir

    return str(scratch_dir())


def checkpoint_reshard() -> dict[str, dict[str, float]]:
    """Save MLPs at TP=2 and load them at TP=1 (other seed, maybe other strategy), then TP=1 -> TP=2.

    Returns per case the relative output difference after loading (must be ~0)
    and before loading (must not be: the loading MLP started from other weights).
    Three layouts in sequence (TP=2 save, TP=1 load and save, TP=2 load) keep
    the process-group set-ups to three.  dist_checkpointing synchronises CUDA
    while saving, hence the CPU adaptation.
    """
    from megatron_sffn import cpu_compat

    cpu_compat.enable_if_no_cuda()
    x, _ = inputs((3, 2))
    expected: dict[tuple[int, str], torch.Tensor] = {}
    results: dict[str, dict[str, float]] = {f"{saved.name} -> {loaded.strategy}": {} for saved, loaded in RESHARD_CASES}

    def save_all(tp: int) -> None:
        for index, (saved, loaded) in enumerate(RESHARD_CASES):
            case = saved if tp == 2 else loaded
            source = build_mlp(case, None, seed=SEED + tp)
            with torch.no_grad():
                expected[index, f"tp{tp}"] = _output(source, x)
            _save(source, os.path.join(_scratch(), f"{index}-tp{tp}"))

    def load_all(tp: int, saved_tp: int) -> None:
        for index, (saved, loaded) in enumerate(RESHARD_CASES):
            case = loaded if tp == 1 else saved
            target = build_mlp(case, None, seed=SEED + 10)
            reference = expected[index, f"tp{saved_tp}"]
            with torch.no_grad():
                before = _output(target, x)
                _load(target, os.path.join(_scratch(), f"{index}-tp{saved_tp}"))
                after = _output(target, x)
            entry = results[f"{saved.name} -> {loaded.strategy}"]
            entry[f"tp{saved_tp}->tp{tp}:after"] = _relative_error(after, reference)
            entry[f"tp{saved_tp}->tp{tp}:before"] = _relative_error(before, reference)

    _init(2)
    save_all(2)
    _init(1)
    load_all(1, saved_tp=2)
    save_all(1)
    _init(2)
    load_all(2, saved_tp=1)
    return results
