"""Divergence detection for EBM training, which eventually explodes (VAEBM App. E).

A step is bad when its energies or gradients are not finite, or when |mean E| or |E+ − E−| passes
its threshold. `patience` bad steps in a row mean divergence; the first of them is the onset, and
checkpoints from the onset on are not trusted (the trainer writes none during a bad streak).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Divergence:
    step: int          # the step at which it was declared
    onset: int         # the first bad step of the streak
    metric: str
    value: float

    def message(self) -> str:
        return (f"training diverged at step {self.step}: {self.metric} = {self.value:.4g} "
                f"(bad since step {self.onset})")


class DivergenceDetector:
    def __init__(self, max_abs_energy: float, max_energy_gap: float, patience: int):
        self.max_abs_energy, self.max_energy_gap, self.patience = max_abs_energy, max_energy_gap, patience
        self.streak = 0
        self.onset: int | None = None

    @property
    def in_bad_streak(self) -> bool:
        return self.streak > 0

    def check(self, step: int, energy_pos: float, energy_neg: float, grads_finite: bool = True) -> Divergence | None:
        """Record one step's energies; returns a `Divergence` once `patience` bad steps ran in a row."""
        problem = self._problem(energy_pos, energy_neg, grads_finite)
        if problem is None:
            self.streak, self.onset = 0, None
            return None
        self.streak += 1
        self.onset = step if self.onset is None else self.onset
        if self.streak >= self.patience:
            return Divergence(step=step, onset=self.onset, metric=problem[0], value=problem[1])
        return None

    def _problem(self, energy_pos: float, energy_neg: float, grads_finite: bool) -> tuple[str, float] | None:
        if not (math.isfinite(energy_pos) and math.isfinite(energy_neg)):
            return ("non-finite energy", energy_pos if not math.isfinite(energy_pos) else energy_neg)
        if not grads_finite:
            return ("non-finite gradient", float("nan"))
        if max(abs(energy_pos), abs(energy_neg)) > self.max_abs_energy:
            return ("|energy|", max(abs(energy_pos), abs(energy_neg)))
        if abs(energy_pos - energy_neg) > self.max_energy_gap:
            return ("|energy_pos - energy_neg|", abs(energy_pos - energy_neg))
        return None

    def state_dict(self) -> dict:
        return {"streak": self.streak, "onset": self.onset}

    def load_state_dict(self, state: dict) -> None:
        self.streak, self.onset = state["streak"], state["onset"]
