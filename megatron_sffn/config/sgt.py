"""The ``sgt`` section of a run: self-guided training of the structured FFN layers.

Self-guided training (SGT, "Building on Efficient Foundations", Wei et al.,
2024) trains each structured linear beside a dense guide whose weight α decays
from 1 to 0 over the guided phase; the guides are then dropped.  It is a
property of the *training run*, not of the model: the trained model has no
guides, and its ``model`` section (which checkpoints are matched against) is
the same with or without SGT.

Example (the paper's headline setting)::

    sgt:
      enabled: true
      mode: same_flops   # S + g steps at the dense model's training FLOPs
      ratio: 0.30        # g / S; null solves it from the FLOP accounting

``python -m megatron_sffn.flops --sgt same_flops ...`` prints the steps and
FLOPs a setting gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class SGTConfig:
    """Self-guided training settings; ``enabled: false`` (the default) trains the structure alone.

    ``mode``: ``fixed_steps`` keeps the run's steps S and adds the guides'
    compute; ``same_flops`` trains S + g steps (g = ``ratio`` × S), the last g
    re-reading the guided phase's data, with the LR schedule over all of them.
    ``guided_fraction``: guided steps T as a fraction of all steps; null means
    0.5 in ``fixed_steps`` and T = g in ``same_flops`` (the paper's accounting).
    ``stochastic``: the cost-saving variant, each linear running its dense
    branch with probability α per micro-batch (all the paper's runs).
    """

    enabled: bool = False
    mode: Literal["fixed_steps", "same_flops"] = "fixed_steps"
    schedule: Literal["cosine", "linear"] = "cosine"
    guided_fraction: float | None = None
    stochastic: bool = True
    ratio: float | None = None

    def __post_init__(self) -> None:
        if self.guided_fraction is not None and not 0.0 < self.guided_fraction <= 1.0:
            raise ValueError(
                f"guided_fraction={self.guided_fraction} must be in (0, 1] (or null for the mode's default)"
            )
        if self.ratio is not None:
            if self.mode != "same_flops":
                raise ValueError(f"ratio={self.ratio} applies to mode='same_flops' only (mode={self.mode!r})")
            if self.ratio <= 0.0:
                raise ValueError(f"ratio={self.ratio} must be positive (or null to solve it)")
