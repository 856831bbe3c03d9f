"""Structured linear layers: Dense, LowRank, BlockDense, BlockShuffle.

Pure PyTorch; nothing here knows about distribution.  Each layer is a linear
map with an exact dense equivalent (``to_dense()``), one bias of size
``out_features`` initialised to zero, and its paper-formula size
(``weight_params()``, ``flops_per_token()``).  With ``skip_bias_add=True`` the
forward returns ``(output, bias)`` the way megatron-core's parallel linears do,
so the bias can be fused into the following activation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import counts, init
from .functional import block_diag_matmul, monarch_matmul


class StructuredLinear(nn.Module):
    """Common surface of every structure (bias handling, sizes, init dispatch)."""

    kind: str = ""
    default_init: str = "normal"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int | None = None,
        blocks: int | None = None,
        bias: bool = True,
        skip_bias_add: bool = False,
        init_method: str | None = None,
        std: float = 0.02,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        counts.validate_structure(self.kind, in_features, out_features, rank, blocks)
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.blocks = blocks
        self.skip_bias_add = skip_bias_add
        self.init_method = init_method or self.default_init
        if self.init_method not in init.INITS:
            raise ValueError(f"{self.kind}: unknown init_method {self.init_method!r}; expected one of {init.INITS}")
        self.std = std
        self._factory = {"dtype": dtype, "device": device}
        self.bias = nn.Parameter(torch.zeros(out_features, **self._factory)) if bias else None

    def _new_weight(self, *shape: int) -> nn.Parameter:
        return nn.Parameter(torch.empty(*shape, **self._factory))

    # -- sizes ---------------------------------------------------------------
    def weight_params(self) -> int:
        """Weight entries by the paper's formula (= multiply-adds per token)."""
        return counts.weight_params(self.kind, self.in_features, self.out_features, self.rank, self.blocks)

    def flops_per_token(self) -> int:
        """Forward FLOPs per token of the weight product (bias adds excluded, as in the paper)."""
        return 2 * self.weight_params()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- compute -------------------------------------------------------------
    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The structured product without bias."""
        return self._product(x, None)

    def _product(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The structured product plus ``bias`` (None: no bias).

        Taking the bias here lets structures that end in a dense factor fuse it
        into the last GEMM (``addmm``) instead of a separate pass over the output.
        """
        raise NotImplementedError

    def to_dense(self) -> torch.Tensor:
        """The exact ``(out_features, in_features)`` matrix of ``project``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor):
        if self.skip_bias_add:
            return self._product(x, None), self.bias
        return self._product(x, self.bias)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        raise NotImplementedError

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}"]
        if self.rank is not None:
            parts.append(f"rank={self.rank}")
        if self.blocks is not None:
            parts.append(f"blocks={self.blocks}")
        parts += [f"bias={self.bias is not None}", f"init={self.init_method}"]
        return ", ".join(parts)


def _init_matrices(method: str, std: float, generator: torch.Generator | None, *weights: torch.Tensor) -> None:
    fill = init.orthogonalize_ if method == "ortho" else init.normal_
    for w in weights:
        fill(w, std, generator)


class Dense(StructuredLinear):
    """Plain ``y = W x + b`` with ``W (out, in)``; the baseline every structure is compared with."""

    kind = "dense"

    def __init__(self, in_features: int, out_features: int, **kwargs) -> None:
        super().__init__(in_features, out_features, **kwargs)
        self.weight = self._new_weight(out_features, in_features)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        _init_matrices(self.init_method, self.std, generator, self.weight)

    def _product(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, self.weight, bias)

    def to_dense(self) -> torch.Tensor:
        return self.weight


class LowRank(StructuredLinear):
    """``y = U (V x)`` with ``V (R, in)`` and ``U (out, R)``."""

    kind = "lowrank"
    default_init = "svd"

    def __init__(self, in_features: int, out_features: int, *, rank: int, **kwargs) -> None:
        super().__init__(in_features, out_features, rank=rank, **kwargs)
        self.v = self._new_weight(rank, in_features)
        self.u = self._new_weight(out_features, rank)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """Re-initialise; with ``svd`` init returns the dense draw the factors approximate."""
        if self.init_method == "svd":
            return init.lowrank_svd_(self.u, self.v, self.std, generator)
        _init_matrices(self.init_method, self.std, generator, self.v, self.u)
        return None

    def _product(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(F.linear(x, self.v), self.u, bias)

    def to_dense(self) -> torch.Tensor:
        return self.u @ self.v


class BlockDense(StructuredLinear):
    """``y = U · blockdiag(K) · x``: B blocks ``K (B, R/B, in/B)`` then a dense ``U (out, R)``."""

    kind = "blockdense"
    default_init = "ortho"

    def __init__(self, in_features: int, out_features: int, *, rank: int, blocks: int, **kwargs) -> None:
        super().__init__(in_features, out_features, rank=rank, blocks=blocks, **kwargs)
        self.k = self._new_weight(blocks, rank // blocks, in_features // blocks)
        self.u = self._new_weight(out_features, rank)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        _init_matrices(self.init_method, self.std, generator, self.k, self.u)

    def _product(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(block_diag_matmul(x, self.k), self.u, bias)

    def to_dense(self) -> torch.Tensor:
        return self.u @ torch.block_diag(*self.k.unbind(0))


def monarch_permutations(blocks: int, middle_block: int, out_block: int):
    """Index vectors of the two fixed shuffles of BlockShuffle.

    Returns ``(mid, out)`` with ``z = h[mid]`` and ``y = u[out]`` where ``h`` and
    ``u`` are block-major vectors (block c occupies ``c*size .. (c+1)*size``).
    """
    c = torch.arange(blocks)
    a = torch.arange(middle_block)
    # z block c, position a  <-  h[a*B + c]
    mid = (a[None, :] * blocks + c[:, None]).reshape(-1)
    t = torch.arange(out_block)
    # y[t*B + c] = u[c*s + t]  =>  out[t*B + c] = c*s + t
    out = (c[None, :] * out_block + t[:, None]).reshape(-1)
    return mid, out


class BlockShuffle(StructuredLinear):
    """The Monarch product of two block-diagonal factors with a fixed shuffle between them.

    Up-projection (in < out): ``W1 (B, in/B, in/B)``, ``W2 (B, out/B, in/B)``.
    Down-projection (in >= out): ``W1 (B, out/B, in/B)``, ``W2 (B, out/B, out/B)``.
    The output is interleaved, ``y[t*B + c] = u_c[t]``, as the paper's index
    semantics have it.  In an FFN this order is part of the function: fc2's
    first factor is block-diagonal over fc1's outputs, so each fc2 block reads
    f/B² hidden units of every fc1 group; another order would connect the
    blocks differently and make a different FFN.
    """

    kind = "blockshuffle"
    default_init = "ortho"

    def __init__(self, in_features: int, out_features: int, *, blocks: int, **kwargs) -> None:
        super().__init__(in_features, out_features, blocks=blocks, **kwargs)
        middle = min(in_features, out_features) // blocks
        self.w1 = self._new_weight(blocks, middle, in_features // blocks)
        self.w2 = self._new_weight(blocks, out_features // blocks, middle)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        _init_matrices(self.init_method, self.std, generator, self.w1, self.w2)

    def _product(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return monarch_matmul(x, self.w1, self.w2, bias=bias)

    def to_dense(self) -> torch.Tensor:
        blocks, middle, _ = self.w1.shape
        mid, out = monarch_permutations(blocks, middle, self.w2.shape[1])
        first = torch.block_diag(*self.w1.unbind(0))
        second = torch.block_diag(*self.w2.unbind(0))
        return (second @ first[mid])[out]


_CLASSES = {cls.kind: cls for cls in (Dense, LowRank, BlockDense, BlockShuffle)}


def build_linear(kind: str, in_features: int, out_features: int, **kwargs) -> StructuredLinear:
    """Construct a layer by structure name (``dense``/``lowrank``/``blockdense``/``blockshuffle``).

    Options that a structure does not take (``rank`` for BlockShuffle, say) must
    be None so that a mistyped config is an error rather than silently ignored.
    """
    counts.check_size_options(kind, **{key: kwargs.get(key) for key in counts.SIZE_OPTIONS})
    for key in counts.SIZE_OPTIONS:
        if key not in counts.STRUCTURE_SIZES[kind]:
            kwargs.pop(key, None)
    return _CLASSES[kind](in_features, out_features, **kwargs)


def ideal_speedup(kind: str, in_features: int, out_features: int, **sizes: int | None) -> float:
    """Dense FLOPs over structured FLOPs: the speed-up a perfect kernel would give."""
    dense = counts.weight_params("dense", in_features, out_features)
    return dense / counts.weight_params(kind, in_features, out_features, sizes.get("rank"), sizes.get("blocks"))


__all__ = [
    "StructuredLinear",
    "Dense",
    "LowRank",
    "BlockDense",
    "BlockShuffle",
    "build_linear",
    "monarch_permutations",
    "ideal_speedup",
]
