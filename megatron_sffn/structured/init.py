"""Initialisations of the paper (structured-ffn spec, section 1).

* ``normal``: every matrix N(0, std^2).
* ``svd`` (LowRank): the best rank-R approximation of a normal dense draw,
  singular values split evenly between the two factors.
* ``ortho`` (block structures): every matrix replaced by ``P Q^T`` from the SVD
  of its own normal draw, i.e. semi-orthogonal with all singular values 1.
"""

from __future__ import annotations

import torch

INITS = ("normal", "svd", "ortho")


def _svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin float64 SVD, on the GPU when there is one.

    Draws always come from the CPU generator so that a seed gives the same
    weights everywhere; only the decomposition moves, because a CPU SVD of every
    (8192, 2048) draw of an xl model takes minutes per rank.
    """
    if torch.cuda.is_available():
        a, s, bh = torch.linalg.svd(matrix.cuda(), full_matrices=False)
        return a.cpu(), s.cpu(), bh.cpu()
    return torch.linalg.svd(matrix, full_matrices=False)


def normal_(weight: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    with torch.no_grad():
        draw = torch.randn(weight.shape, generator=generator, dtype=torch.float32) * std
        weight.copy_(draw)
    return weight


def orthogonalize_(weight: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill ``weight`` (a matrix or a stack of matrices) with ``P Q^T`` of normal draws."""
    with torch.no_grad():
        draw = torch.randn(weight.shape, generator=generator, dtype=torch.float64) * std
        p, _, qh = _svd(draw)
        weight.copy_(p @ qh)
    return weight


def lowrank_svd_(
    u: torch.Tensor, v: torch.Tensor, std: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Set ``U (M, R)`` and ``V (R, N)`` from the SVD of a dense N(0, std^2) draw.

    Returns the dense draw so that callers (and tests) can check that ``U V`` is
    its best rank-R approximation.
    """
    rank = v.shape[0]
    with torch.no_grad():
        dense = torch.randn((u.shape[0], v.shape[1]), generator=generator, dtype=torch.float64) * std
        a, s, bh = _svd(dense)
        root = s[:rank].sqrt()
        u.copy_(a[:, :rank] * root)
        v.copy_(root[:, None] * bh[:rank])
    return dense
