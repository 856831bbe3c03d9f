"""What every tensor-parallel structured linear shares: megatron's MLP-linear contract.

megatron-core 0.16.1's ``MLP`` builds fc1 as ``cls(input_size, output_size,
config=, init_method=, gather_output=False, bias=, skip_bias_add=True,
is_expert=, tp_comm_buffer_name=, tp_group=, stride=)`` and fc2 with
``input_is_parallel=True`` instead of ``gather_output``/``stride``; both
return ``(output, bias_or_None)``; fc1's output is this rank's shard of the
hidden units and fc2's output is complete on every rank.  Structure options
(``rank``, ``blocks``, ``init``, ``std``, ``tp_strategy``) arrive through
``ModuleSpec.params``.

Initialisation draws the *full* factors exactly as the pure layer
:func:`megatron_sffn.structured.build_linear` does (CPU, default generator) and
keeps this rank's slice, so one seed gives the same full weights at every TP
size and TP=2 computes what TP=1 computes.  Megatron's ``init_method`` is not
used: each structure has its own initialisation (structured-ffn spec, sec. 1).

A structure's factors (full shape, how the group holds them, which axis is
split) are declared once, by its plan (:data:`.plans.PLANS`); subclasses take
them from the pure layer in :meth:`_full_from_pure` and compute in
:meth:`_project`.  This class turns the declaration into parameters,
megatron's TP attributes and a TP-size-independent sharded checkpoint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from ..structured import build_linear
from ..structured.functional import block_diag_matmul
from ..structured.take import take
from . import comm, grads
from .guide import GuideMixin
from .layout import (
    SHARDED,
    TOKEN_SPLIT,
    FactorSpec,
    TPLayout,
    padded_tokens,
    set_tp_attributes,
    shard_ranges,
    take_rows,
)
from .plan import FFNShape, TPStrategy, choose_strategy, require_shardable
from .plans import PLANS
from .premerge import PreMergeMixin

if TYPE_CHECKING:
    from .subnetwork import HiddenSelection


class TPStructuredLinear(GuideMixin, PreMergeMixin, MegatronModule):
    """Base of the fc1/fc2 classes; ``kind`` is the structure, ``role`` is "fc1" or "fc2".

    ``init_method`` and ``tp_comm_buffer_name`` belong to megatron's contract
    and are accepted unused (structures initialise themselves; there are no
    communication buffers to register).  ``tp_group`` may also be a
    :class:`~.comm.ShapeOnlyGroup` to build one rank of a larger group alone.
    """

    kind: str = ""
    role: str = ""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: TransformerConfig,
        init_method: Any = None,
        bias: bool = True,
        skip_bias_add: bool = False,
        is_expert: bool = False,
        tp_comm_buffer_name: str | None = None,
        tp_group: Any = None,
        stride: int = 1,
        gather_output: bool = False,
        input_is_parallel: bool = True,
        rank: int | None = None,
        blocks: int | None = None,
        init: str | None = None,
        std: float = 0.02,
        tp_strategy: str | None = "auto",
    ) -> None:
        super().__init__(config=config)
        name = f"{self.kind} {self.role}"
        if is_expert:
            raise ValueError(f"{name}: structured layers are not supported inside mixture-of-experts (is_expert=True)")
        if config.sequence_parallel:
            raise ValueError(f"{name}: sequence_parallel=True is not supported by structured FFN layers")
        if gather_output or not input_is_parallel:
            raise ValueError(
                f"{name}: fc1 must return its shard of the hidden units (gather_output=False) and fc2 must take "
                f"it (input_is_parallel=True); got gather_output={gather_output}, input_is_parallel={input_is_parallel}"
            )
        gated = bool(config.gated_linear_unit)
        if self.role == "fc1" and stride != (2 if gated else 1):
            raise ValueError(f"{name}: stride={stride} does not match gated_linear_unit={gated}")
        self.input_size, self.output_size = input_size, output_size
        self.skip_bias_add = skip_bias_add
        self.tp_group = _resolve_group(tp_group)
        self.layout = TPLayout(self.tp_group.rank(), self.tp_group.size())
        if self.role == "fc1":
            hidden, ffn_hidden = input_size, output_size // (2 if gated else 1)
        else:
            hidden, ffn_hidden = output_size, input_size
        self.shape = FFNShape(self.kind, hidden, ffn_hidden, rank, blocks, gated)
        require_shardable(self.shape, self.layout.size)
        self.strategy: TPStrategy = choose_strategy(self.shape, self.layout.size, tp_strategy)
        self._factors = self._factor_specs()
        full = self._draw_full_factors(init, std) if config.perform_initialization else None
        for factor, spec in self._factors.items():
            source = full[factor] if full is not None else torch.empty(spec.shape)
            self._add_factor(factor, spec, source.to(config.params_dtype))
        self._add_bias(bias, config.params_dtype)
        self._init_guide()
        self._init_merged()
        # Checkpoints written by modules that carry no _extra_state still load.
        self._register_load_state_dict_pre_hook(
            lambda state_dict, prefix, *args, **kwargs: state_dict.setdefault(f"{prefix}_extra_state")
        )

    # -- declaration -------------------------------------------------------------
    def _factor_specs(self) -> dict[str, FactorSpec]:
        """This linear's factors as its structure's plan declares them for the chosen strategy."""
        return PLANS[self.kind].factors(self.shape, self.strategy)[self.role]

    # -- structure (subclasses) ------------------------------------------------------
    def _full_from_pure(self, pure: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The full factors in this class's storage layout, taken from the pure layer."""
        raise NotImplementedError

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """The structured product on ``(tokens, features)``, bias excluded."""
        raise NotImplementedError

    # -- construction ---------------------------------------------------------
    def _draw_full_factors(self, init: str | None, std: float) -> dict[str, torch.Tensor]:
        pure = build_linear(
            self.kind,
            self.input_size,
            self.output_size,
            rank=self.shape.rank,
            blocks=self.shape.blocks,
            bias=False,
            init_method=init,
            std=std,
        )
        return {name: t.detach() for name, t in self._full_from_pure(pure).items()}

    def local_view(self, factor: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of a full-size tensor of ``factor`` (a weight, a gradient, ...)."""
        spec = self._factors[factor]
        if spec.placement != SHARDED:
            return full
        return take_rows(full, self._ranges(spec), spec.axis)

    def _ranges(self, spec: FactorSpec) -> list[slice]:
        return shard_ranges(spec.shape[spec.axis], self.layout, self.shape.stride if spec.strided else 1)

    def _add_factor(self, factor: str, spec: FactorSpec, full: torch.Tensor) -> None:
        param = torch.nn.Parameter(self.local_view(factor, full).contiguous())
        if spec.placement == SHARDED:
            set_tp_attributes(param, spec.axis, self.shape.stride if spec.strided else 1)
        elif spec.placement == TOKEN_SPLIT:
            grads.mark_token_split(param)
        self.register_parameter(factor, param)

    def _add_bias(self, bias: bool, dtype: torch.dtype) -> None:
        if not bias:
            self.register_parameter("bias", None)
            return
        if self.role == "fc1":  # one bias per local hidden unit, split like fc1's output
            width = sum(r.stop - r.start for r in shard_ranges(self.output_size, self.layout, self.shape.stride))
            self.bias = torch.nn.Parameter(torch.zeros(width, dtype=dtype))
            set_tp_attributes(self.bias, 0, self.shape.stride)
        else:  # added once to the complete output: replicated
            self.bias = torch.nn.Parameter(torch.zeros(self.output_size, dtype=dtype))

    # -- compute ---------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        out = self._guided(x, self._structured_or_merged(x))
        return self._with_bias(out.reshape(*lead, out.shape[-1]), self.bias)

    def forward_hidden_subset(
        self, x: torch.Tensor, selection: HiddenSelection
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Only the selected hidden units: fc1 returns their outputs, fc2 reads them (scaled by 1/p).

        Evolving subnetwork training's smaller products (see :mod:`.subnetwork`); the guide of
        self-guided training does not take part (the two are not combined).
        """
        lead = x.shape[:-1]
        out = self._project_subset(x.reshape(-1, x.shape[-1]), selection)
        bias = self.bias
        if self.role == "fc1" and bias is not None:
            bias = take(bias, selection.fc1_rows(self.shape.gated))
        return self._with_bias(out.reshape(*lead, out.shape[-1]), bias)

    def _with_bias(self, out: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.skip_bias_add or bias is None:
            return out, bias if self.skip_bias_add else None
        return out + bias, None

    def _project_subset(self, x: torch.Tensor, selection: HiddenSelection) -> torch.Tensor:
        """:meth:`_project` restricted to the selected hidden units (structures that support it)."""
        raise NotImplementedError(f"{self.kind} {self.role} has no hidden-unit subsets")

    def _whole_block_diag(self, x: torch.Tensor, weight: torch.nn.Parameter) -> torch.Tensor:
        """fc1's block-diagonal in-factor ``blockdiag(weight) · x``, complete on every rank.

        ``split``: this rank's whole blocks on its d/tp input features, the
        outputs all-gathered (partial gradients reduce-scattered back);
        ``replicated``: every block on every rank, the input gradient all-reduced.
        """
        group = self.tp_group
        if self.strategy.fc1_in == "split":
            h_local = block_diag_matmul(comm.split_features(x, group), weight)
            return comm.gather_features(h_local, group, partial_grad=True)
        return comm.copy_to_region(block_diag_matmul(x, weight), group)

    def _token_split(self, param: torch.nn.Parameter) -> torch.Tensor:
        return grads.token_split_weight(param, self.layout.size)

    def _pad_tokens(self, x: torch.Tensor) -> torch.Tensor:
        pad = padded_tokens(x.shape[0], self.layout.size) - x.shape[0]
        return torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x

    def _gather_output_tokens(self, y_slice: torch.Tensor, tokens: int) -> torch.Tensor:
        """Token slices of the complete output -> the complete output on every rank."""
        return comm.gather_tokens(y_slice, self.tp_group, partial_grad=False)[:tokens]

    def backward_dw(self) -> None:
        """Weight gradients are computed in the backward pass itself (no delayed wgrad)."""

    # -- checkpoint --------------------------------------------------------------
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Each factor under its full, TP-independent shape: sharded along its split axis or replicated.

        A gated fc1's output factors hold ``[gate_r, value_r]``; they are
        described as two shards with megatron's own gated-FFN factory, so the
        global tensor is ``[gate, value]`` at every TP size (the MLP applies
        the same factory to fc1's ``bias``).
        """
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.transformer.utils import (
            ensure_metadata_has_dp_cp_group,
            make_sharded_tensors_for_checkpoint,
        )

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        axes = {name: spec.axis for name, spec in self._factors.items() if spec.placement == SHARDED}
        if self.role == "fc1":
            axes["bias"] = 0
        if self.guide is not None:
            axes["guide"] = self.guide_split()[0]
        state = self.state_dict(prefix="", keep_vars=True)
        sharded = make_sharded_tensors_for_checkpoint(
            state, prefix, axes, sharded_offsets, tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"]
        )
        if self.shape.stride > 1:
            singleton = metadata.get("singleton_local_shards", False)
            strided = [name for name, spec in self._factors.items() if spec.strided]
            if self.guide is not None and self.role == "fc1":
                strided.append("guide")
            for name in strided:
                key = f"{prefix}{name}"
                sharded[key] = apply_swiglu_sharded_factory(sharded[key], sharded_offsets, singleton)
        return sharded

    def set_extra_state(self, state: Any) -> None:
        """Nothing to restore here; a structure whose checkpoints need a check overrides this (BlockShuffle)."""

    def get_extra_state(self) -> Any:
        """Megatron's stock and Transformer Engine linears carry ``_extra_state``; keep the same keys."""
        return None

    def extra_repr(self) -> str:
        size = f"rank={self.shape.rank}, " if self.shape.rank else ""
        size += f"blocks={self.shape.blocks}, " if self.shape.blocks else ""
        return (
            f"{self.input_size} -> {self.output_size}, {size}tp={self.layout.rank}/{self.layout.size}, "
            f"strategy={self.strategy}"
        )


def _resolve_group(tp_group: Any):
    """The TP group: the one given, megatron's, or (no torch.distributed) a single-rank stand-in."""
    if tp_group is not None:
        return tp_group
    from megatron.core.utils import get_tensor_model_parallel_group_if_none

    group = get_tensor_model_parallel_group_if_none(None)
    return group if group is not None else comm.ShapeOnlyGroup(0, 1)
