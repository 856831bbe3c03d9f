"""Run megatron-core on a machine without CUDA.

megatron-core assumes a GPU in a handful of places that have nothing to do
with the maths: CUDA RNG states, ``torch.cuda.current_device()`` /
``synchronize()``, literal ``device="cuda"`` allocations in the pipeline
schedules, p2p communication, DDP buffers and the optimizer, ``.cuda()`` moves,
``param.type() == "torch.cuda.FloatTensor"`` checks, and a core attention whose
default causal mask lives on CUDA.  Development and CI machines have no GPU, so
this module adapts exactly those places and nothing else:

* :class:`SDPACoreAttention` fills the layer spec's ``core_attention`` slot;
* :class:`CpuRNGStatesTracker` stands in for megatron's CUDA RNG tracker, so
  ``tensor_parallel.model_parallel_cuda_manual_seed`` and
  ``get_cuda_rng_tracker().fork()`` work unchanged;
* :class:`CudaToCpuMode`, a ``TorchFunctionMode``, sends every CUDA allocation
  and move to the CPU and answers tensor type queries as CUDA would.

It is the only place in the project that patches megatron or torch.  It does
nothing unless :func:`enable_if_no_cuda` is called on a machine without CUDA,
so a GPU run never touches it.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode

_MODE: "CudaToCpuMode | None" = None

# ---------------------------------------------------------------------------
# device redirection


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    # A bare index means a CUDA ordinal (megatron writes device=torch.cuda.current_device()).
    return isinstance(device, int) and not isinstance(device, bool)


def _cpu_if_cuda(device: Any) -> Any:
    return torch.device("cpu") if _is_cuda_device(device) else device


class CudaToCpuMode(TorchFunctionMode):
    """Redirect CUDA placement to the CPU and report CPU tensors as CUDA tensors by type name.

    The type-name answer is what megatron's optimizer and gradient clipping
    check (``param.type() == "torch.cuda.FloatTensor"``) before accepting a
    parameter; the storage stays on the CPU.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type:
            return self._type(args, kwargs)
        if "device" in kwargs:
            kwargs = {**kwargs, "device": _cpu_if_cuda(kwargs["device"])}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], torch.device("cpu"), *args[2:])
        return func(*args, **kwargs)

    @staticmethod
    def _type(args: tuple, kwargs: dict) -> Any:
        tensor, rest = args[0], list(args[1:])
        target = rest[0] if rest else kwargs.get("dtype")
        if target is None:
            name = torch.Tensor.type(tensor)
            return name.replace("torch.", "torch.cuda.", 1) if tensor.device.type == "cpu" else name
        if isinstance(target, str):
            target = target.replace("torch.cuda.", "torch.", 1)
        if rest:
            rest[0] = target
        else:
            kwargs = {**kwargs, "dtype": target}
        return torch.Tensor.type(tensor, *rest, **kwargs)


# ---------------------------------------------------------------------------
# RNG


def _cpu_rng_tracker_class() -> type:
    """Subclass megatron's tracker so ``isinstance`` checks in megatron keep working."""
    from megatron.core.tensor_parallel.random import _MODEL_PARALLEL_RNG_TRACKER_NAME, CudaRNGStatesTracker

    class CpuRNGStatesTracker(CudaRNGStatesTracker):
        """Named RNG streams (data-parallel, model-parallel, expert) held as CPU generator states."""

        def __init__(self) -> None:
            super().__init__(use_cudagraphable_rng=False)

        def add(self, name: str, seed: int) -> None:
            if seed in self.seeds_:
                raise ValueError(f"RNG seed {seed} is already tracked")
            if name in self.states_:
                raise ValueError(f"RNG state {name!r} is already tracked")
            self._is_initialized = True
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name: str = _MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
            if name not in self.states_:
                raise KeyError(f"RNG state {name!r} is not tracked; call model_parallel_cuda_manual_seed first")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    return CpuRNGStatesTracker


def _install_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._CUDA_RNG_STATE_TRACKER = _cpu_rng_tracker_class()()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # Activation recomputation saves and restores "the CUDA generator" around
    # the recomputed forward; on CPU the default generator plays that part.
    mrandom._get_cuda_rng_state = _get_cpu_rng_state
    mrandom._set_cuda_rng_state = _set_cpu_rng_state


def _get_cpu_rng_state(device: Any = None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


# ---------------------------------------------------------------------------
# core attention


@functools.cache
def core_attention_class() -> type:
    """The CPU core-attention module class (built lazily: megatron imports take seconds)."""
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.module import MegatronModule

    class SDPACoreAttention(MegatronModule):
        """Core attention through ``scaled_dot_product_attention``.

        Same constructor and ``forward`` contract as megatron's
        ``DotProductAttention``: ``query [sq, b, np, hn]``, ``key``/``value``
        ``[sk, b, ng, hn]`` (GQA when ng < np; query head i reads group
        ``i // (np/ng)``), megatron masks with True = masked, output
        ``[sq, b, np * hn]``.
        """

        def __init__(
            self,
            config,
            layer_number: int,
            attn_mask_type,
            attention_type: str,
            attention_dropout: float | None = None,
            softmax_scale: float | None = None,
            cp_comm_type: str | None = None,
            pg_collection=None,
        ) -> None:
            super().__init__(config=config)
            if config.context_parallel_size != 1:
                raise ValueError(
                    f"context_parallel_size={config.context_parallel_size}: CPU core attention supports only 1"
                )
            if config.softmax_type != "vanilla" or config.window_size is not None:
                raise ValueError(
                    f"softmax_type={config.softmax_type!r}, window_size={config.window_size}: "
                    "CPU core attention supports only vanilla softmax without sliding windows"
                )
            self.attn_mask_type = attn_mask_type
            self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
            self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

        def forward(
            self,
            query: torch.Tensor,
            key: torch.Tensor,
            value: torch.Tensor,
            attention_mask: torch.Tensor | None,
            attn_mask_type=None,
            attention_bias: torch.Tensor | None = None,
            packed_seq_params=None,
        ) -> torch.Tensor:
            if packed_seq_params is not None or attention_bias is not None:
                raise ValueError("CPU core attention supports neither packed sequences nor attention bias")
            mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
            sq, b, heads, dim = query.shape
            # SDPA wants [b, heads, s, dim]
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
            causal = attention_mask is None and mask_type == AttnMaskType.causal and sq > 1
            allowed = None if attention_mask is None else ~attention_mask
            out = torch.nn.functional.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=allowed,
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=causal,
                scale=self.softmax_scale,
                enable_gqa=k.shape[1] != heads,
            )
            return out.permute(2, 0, 1, 3).reshape(sq, b, heads * dim)

    return SDPACoreAttention


# ---------------------------------------------------------------------------
# activation


def _current_device() -> int:
    return 0


def _synchronize(device: Any = None) -> None:
    """CPU work is synchronous; nothing to wait for."""


def enable_if_no_cuda() -> bool:
    """Adapt megatron-core to the CPU when CUDA is absent; returns whether the adaptation is active.

    Idempotent, so every entry point (model builder, trainer, test worker)
    may call it.  The device mode is entered for the rest of the process on the
    calling thread; autograd carries it into backward.
    """
    global _MODE
    if torch.cuda.is_available():
        return False
    if _MODE is None:
        _install_rng_tracker()
        torch.cuda.current_device = _current_device
        torch.cuda.synchronize = _synchronize
        _MODE = CudaToCpuMode()
        _MODE.__enter__()
    return True


def is_active() -> bool:
    """Whether :func:`enable_if_no_cuda` has adapted this process to the CPU."""
    return _MODE is not None
