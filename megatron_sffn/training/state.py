"""The trainer's own counters, saved in every checkpoint beside model and optimizer."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class TrainProgress:
    """Where a run is; identical on every rank.

    ``step`` counts training steps taken, skipped ones included (they consume
    their batch); ``skipped_steps`` counts those whose update was dropped for a
    non-finite loss or gradient, and ``consecutive_nonfinite`` the current
    streak of them, so a run resumed in the middle of a streak still stops at
    the configured limit.
    """

    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0

    def state_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, int]) -> "TrainProgress":
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(fields - set(state))
        if missing:
            raise ValueError(f"checkpoint progress record lacks {missing}; found keys {sorted(state)}")
        return cls(**{name: int(state[name]) for name in fields})

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a checkpoint's record, in place (the trainer's parts share this object)."""
        for name, value in dataclasses.asdict(self.from_state_dict(state)).items():
            setattr(self, name, value)
