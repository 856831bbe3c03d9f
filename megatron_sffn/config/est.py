"""The ``est`` section of a run: evolving subnetwork training.

Evolving Subnetwork Training (EST, "Evolving Subnetwork Training for Large
Language Models", Li et al., ICML 2024) trains a random subnetwork of the
model at every step and lets it grow in three stages:

1. layers, attention heads and MLP hidden units are all sampled
   (rates ``p_L``, ``p_H``, ``p_M``);
2. every layer is kept; heads and hidden units are still sampled;
3. the full model.

Kept heads and hidden units are scaled by 1/p; a skipped layer passes the
residual stream through unchanged.  Like self-guided training it belongs to
the *training run*: the trained model is the ordinary model, with the same
``model`` section and checkpoints.  The paper does not publish its rates or
stage boundaries; the defaults below are ours, chosen to save about the
FLOPs the paper reports (30% of the dense s model's training FLOPs, 27% with
32% LowRank FFNs).  ``benchmarks/est_study.py`` compares them with the full
model at equal training FLOPs.  In its 150-step CPU study, EST ended with a
higher validation loss (+0.38 dense, +0.48 LowRank; +0.15 with stages ending
at 0.1 / 0.25).  The paper's claim of no higher loss comes from runs
thousands of times longer, which the study cannot check (benchmarks/RESULTS.md).

Example::

    est:
      enabled: true
      stage_ends: [0.3, 0.6]            # stage 1 up to 30% of the steps, stage 2 up to 60%, then full
      stage1: {p_L: 0.5, p_H: 0.5, p_M: 0.5}
      stage2: {p_H: 0.5, p_M: 0.5}

``python -m megatron_sffn.flops --est ...`` prints the FLOPs a schedule saves.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def _require_rate(**rates: float) -> None:
    for key, value in rates.items():
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{key}={value} must be in (0, 1] (the fraction of the units kept)")


@dataclass
class ESTStage1:
    """Rates of stage 1: fractions of layers, attention heads and MLP hidden units kept per step."""

    p_L: float = 0.5
    p_H: float = 0.5
    p_M: float = 0.5

    def __post_init__(self) -> None:
        _require_rate(p_L=self.p_L, p_H=self.p_H, p_M=self.p_M)


@dataclass
class ESTStage2:
    """Rates of stage 2: every layer is kept; fractions of attention heads and MLP hidden units kept."""

    p_H: float = 0.5
    p_M: float = 0.5

    def __post_init__(self) -> None:
        _require_rate(p_H=self.p_H, p_M=self.p_M)


@dataclass
class ESTConfig:
    """Evolving subnetwork training; ``enabled: false`` (the default) trains the full model every step.

    ``stage_ends``: the ends of stages 1 and 2 as fractions of the run's
    steps (stage 1 is steps 1..⌊a·T⌋, stage 2 up to ⌊b·T⌋, stage 3 the rest).
    ``seed``: the draws' seed (null: ``training.seed``).
    ``tensor_strata`` / ``layer_strata``: the draws keep the same number of
    heads and hidden units in each of ``tensor_strata`` equal contiguous
    parts of a layer's heads and hidden units, and the same number of layers
    in each of ``layer_strata`` equal contiguous parts of the layers.  Null
    means the run's tensor (pipeline) parallel size, so every rank (stage)
    does equal work; the draws depend on these numbers, so set them
    explicitly to keep a run's draws when it changes layout.
    """

    enabled: bool = False
    stage_ends: list[float] = field(default_factory=lambda: [0.3, 0.6])
    stage1: ESTStage1 = field(default_factory=ESTStage1)
    stage2: ESTStage2 = field(default_factory=ESTStage2)
    seed: int | None = None
    tensor_strata: int | None = None
    layer_strata: int | None = None

    def __post_init__(self) -> None:
        ends = self.stage_ends
        if len(ends) != 2:
            raise ValueError(f"stage_ends={ends} must list two fractions: the ends of stages 1 and 2")
        if not 0.0 <= ends[0] <= ends[1] <= 1.0:
            raise ValueError(f"stage_ends={ends}: stages out of order; expected 0 <= stage 1 end <= stage 2 end <= 1")
        for key, value in (
            ("seed", self.seed),
            ("tensor_strata", self.tensor_strata),
            ("layer_strata", self.layer_strata),
        ):
            if value is not None and value < (0 if key == "seed" else 1):
                raise ValueError(f"{key}={value} must be {'>= 0' if key == 'seed' else 'positive'} (or null)")
