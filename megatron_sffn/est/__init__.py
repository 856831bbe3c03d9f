"""Evolving subnetwork training: the schedule and the per-step draws (pure; no distribution, no megatron)."""

from .draws import LayerDraw, Subset, draw_subset, kept_count
from .plan import ESTPlan, StageRates, build_plan, plan_problems

__all__ = ["ESTPlan", "LayerDraw", "StageRates", "Subset", "build_plan", "draw_subset", "kept_count", "plan_problems"]
