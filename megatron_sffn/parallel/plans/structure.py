"""What a structure plan declares, and the values it is declared over.

A plan is the one declaration of how a structure's FFN is split over a
tensor-parallel group: the modes its fc1 in-factor and fc2 out-factor may
take, every weight factor of both linears (full shape, placement, split
axis), the traffic one rank sends and the inner features the linears keep
for the backward pass.  The modules (:mod:`..base`) build their parameters
from :meth:`StructurePlan.factors`, the cost model (:mod:`..plan`) counts the
same declaration, and the memory estimate reads :meth:`StructurePlan.saved_features`.
Plain Python: no megatron, no process groups.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

from ...structured import counts
from ..layout import FactorSpec

ROLES = ("fc1", "fc2")


@dataclass(frozen=True)
class TPStrategy:
    """The modes of fc1's in-factor and fc2's out-factor, written ``"<fc1_in>/<fc2_out>"``."""

    fc1_in: str
    fc2_out: str

    def __str__(self) -> str:
        return f"{self.fc1_in}/{self.fc2_out}"


@dataclass(frozen=True)
class FFNShape:
    """One FFN: ``hidden -> ffn_hidden (x2 when gated) -> hidden`` with a structure."""

    kind: str
    hidden: int
    ffn_hidden: int
    rank: int | None = None
    blocks: int | None = None
    gated: bool = False

    @property
    def stride(self) -> int:
        """How many equal parts fc1's output has (gate and value for a gated FFN)."""
        return 2 if self.gated else 1

    @property
    def fc1_out(self) -> int:
        return self.stride * self.ffn_hidden

    def validate(self) -> None:
        counts.validate_structure(self.kind, self.hidden, self.fc1_out, self.rank, self.blocks)
        counts.validate_structure(self.kind, self.ffn_hidden, self.hidden, self.rank, self.blocks)


class StructurePlan(ABC):
    """One structure under tensor parallelism; one stateless instance per structure in :data:`PLANS`.

    ``in_modes`` and ``out_modes`` are the modes of fc1's in-factor and fc2's
    out-factor, in the order the automatic choice breaks ties by; a structure
    without them (dense) has no strategy, and its methods get ``None``.
    """

    kind: ClassVar[str]
    in_modes: ClassVar[tuple[str, ...]] = ()
    out_modes: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def factors(self, shape: FFNShape, strategy: TPStrategy | None) -> dict[str, dict[str, FactorSpec]]:
        """``{"fc1": {name: spec}, "fc2": {name: spec}}``: every weight factor in the modules' storage layout.

        Each linear's factors in the order its input meets them: the in-factor first.
        """

    @abstractmethod
    def traffic(self, shape: FFNShape, strategy: TPStrategy | None, tp: int) -> tuple[Fraction, Fraction]:
        """(forward, backward) elements one rank sends per token."""

    @abstractmethod
    def saved_features(self, shape: FFNShape, strategy: TPStrategy | None, tp: int) -> int:
        """Inner features per token one rank's two linears keep for the backward pass (inputs excluded).

        ``strategy`` is None at ``tp=1``, where every factor is whole on the one rank.
        """

    def require_shardable(self, shape: FFNShape, tp: int) -> None:
        """Raise a ValueError naming the numbers if the structure's own layout cannot be split ``tp`` ways.

        Called after the checks every FFN shares (a valid shape, ``ffn_hidden`` divisible by ``tp``).
        The default: a structure with no rules of its own.
        """
        return None


def gathered(features: int, tp: int) -> Fraction:
    """Elements one rank sends per token to all-gather (or reduce-scatter) ``features`` over ``tp`` ranks."""
    return Fraction(features * (tp - 1), tp)


def all_reduced(features: int, tp: int) -> Fraction:
    """An all-reduce is a reduce-scatter and an all-gather."""
    return 2 * gathered(features, tp)


def all_to_all(features: int, tp: int) -> Fraction:
    """``features`` spread over the ranks (features/tp each) re-cut along tokens: each sends (tp-1)/tp of its own."""
    return Fraction(features, tp) * Fraction(tp - 1, tp)


def fc1_in_traffic(mode: str, middle: int, hidden: int, tp: int) -> tuple[Fraction, Fraction]:
    """(forward, backward) traffic of an fc1 in-factor whose ``middle``-long output every rank needs whole.

    ``split``: each rank computes 1/tp of it, then all-gathers it; backward,
    the partial gradients are reduce-scattered and the input gradient
    all-gathered.  ``replicated``: computed whole on every rank; backward,
    the input gradient is all-reduced.
    """
    if mode == "split":
        return gathered(middle, tp), gathered(middle, tp) + gathered(hidden, tp)
    return Fraction(0), all_reduced(middle, tp)
