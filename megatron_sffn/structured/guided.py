"""Self-guided training (SGT), the method itself: the guided layer, the α schedules and the guide draws.

"Building on Efficient Foundations" (Wei et al., NeurIPS 2024) trains each
structured layer beside a dense guide ``W_g`` initialised to the layer's own
dense equivalent::

    o = α · W_g x + (1 − α) · structured(x)   (+ bias)

α starts at 1 and decays to 0 over the first ``T`` optimizer steps, after
which the guide is dropped for good.  With the cost-saving variant (used in
all the paper's SGT runs) each layer, on each micro-batch, runs the dense
branch only with probability α and is otherwise purely structured.

Everything here is pure: no process groups, no optimizer.  The tensor-parallel
layers (:mod:`megatron_sffn.parallel.guide`) and the trainer's controller
(:mod:`megatron_sffn.training.self_guided`) reuse the schedule, the draws and
:func:`mix_guided`, so the method is written down exactly once.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.functional import linear

from .layers import StructuredLinear

SCHEDULES = ("cosine", "linear")
_MASK64 = (1 << 64) - 1


def guide_alpha(step: int, guided_steps: int, schedule: str = "cosine") -> float:
    """α after ``step`` optimizer steps of a guided phase of ``guided_steps`` steps.

    cosine: ``½(1 + cos(π t / T))``; linear: ``1 − t / T``; both 0 from ``t = T``
    on (and always 0 when ``T = 0``, a run without guidance).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown SGT schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    if step < 0 or guided_steps < 0:
        raise ValueError(f"step={step} and guided_steps={guided_steps} must be >= 0")
    if step >= guided_steps:
        return 0.0
    progress = step / guided_steps
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def expected_guide_steps(guided_steps: int, schedule: str = "cosine", *, stochastic: bool = True) -> float:
    """Expected number of steps on which a layer runs its dense branch.

    The forward of update ``t + 1`` uses ``α(t)``, so the guided phase spans
    updates 1..T.  The cost-saving variant runs the branch with probability
    α: ``Σ_{t<T} α(t)``, which is ``(T + 1) / 2`` for both schedules (the
    paper's "0.5 × T steps of dense FFN compute").  Without it the branch
    runs on every guided step: ``T``.
    """
    if not stochastic:
        return float(guided_steps)
    return math.fsum(guide_alpha(t, guided_steps, schedule) for t in range(guided_steps))


def _splitmix64(state: int) -> int:
    state = (state + 0x9E3779B97F4A7C15) & _MASK64
    state = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    state = ((state ^ (state >> 27)) * 0x94D049BB133111EB) & _MASK64
    return state ^ (state >> 31)


def guide_draw(seed: int, step: int, micro_batch: int, layer: int) -> float:
    """A uniform number in [0, 1) that is a pure function of its four counters.

    A counter-based generator (SplitMix64 chained over the counters) instead
    of a stateful RNG: every tensor-parallel rank of a layer computes the same
    number without communicating, and a resumed run draws exactly what the
    uninterrupted run drew, with no generator state to checkpoint.
    """
    state = 0
    for counter in (seed, step, micro_batch, layer):
        if counter < 0:
            raise ValueError(
                f"guide draw counters must be >= 0, got seed={seed} step={step} micro_batch={micro_batch} layer={layer}"
            )
        state = _splitmix64(state ^ (counter & _MASK64))
    return (state >> 11) / float(1 << 53)


def drawn_alpha(alpha: float, seed: int, step: int, micro_batch: int, layer: int, *, stochastic: bool = True) -> float:
    """The mixing weight one layer uses on one micro-batch: α when its dense branch runs, else 0.

    ``step`` is the update being computed (1-based), ``alpha`` its α.  The
    cost-saving variant runs the dense branch with probability α; without it
    every forward of the guided phase mixes.
    """
    if alpha <= 0.0:
        return 0.0
    if not stochastic or guide_draw(seed, step, micro_batch, layer) < alpha:
        return alpha
    return 0.0


def mix_guided(alpha: float, guide_out: torch.Tensor, structured_out: torch.Tensor) -> torch.Tensor:
    """``α · guide + (1 − α) · structured``; exactly the guide's output at α = 1."""
    return alpha * guide_out + (1.0 - alpha) * structured_out


class GuidedLinear(nn.Module):
    """A structured layer with its dense guide (pure PyTorch).

    ``guide_alpha`` is the weight of the dense branch in the next forward; 0
    skips the branch entirely (no FLOPs), which is how both the end of the
    guided phase and a missed draw of the cost-saving variant look to the
    layer.  :meth:`drop_guide` removes the guide for good, after which the
    layer is exactly its structured layer (parameters, state dict, compute).
    """

    def __init__(self, structured: StructuredLinear) -> None:
        super().__init__()
        self.structured = structured
        self.guide: nn.Parameter | None = nn.Parameter(structured.to_dense().detach().clone())
        self.guide_alpha = 1.0

    def drop_guide(self) -> None:
        self.guide = None
        self.guide_alpha = 0.0

    def forward(self, x: torch.Tensor):
        layer = self.structured
        out = layer.project(x)
        if self.guide is not None and self.guide_alpha > 0.0:
            out = mix_guided(self.guide_alpha, linear(x, self.guide), out)
        if layer.skip_bias_add:
            return out, layer.bias
        return out if layer.bias is None else out + layer.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"guide={'none' if self.guide is None else tuple(self.guide.shape)}, guide_alpha={self.guide_alpha}"
