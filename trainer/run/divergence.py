"""Divergence detection, one policy for both loops.

EBM training eventually explodes (VAEBM App. E); NVAE pretraining can too (a NaN loss, then NaN weights that
would skip every later update). A step is bad when its loss or energies, its gradients or (checked where a
checkpoint is due) its weights are not finite, or, for energies, when |mean E| or |E+ − E−| passes its
threshold. `patience` bad steps in a row mean divergence; the first of them is the onset, and checkpoints from
the onset on are not trusted (the loops write none during a bad streak). `stop_diverged` marks the run
(`DIVERGED.json`), drops those checkpoints and raises `TrainingDiverged` (exit code 3).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import TrainingDiverged


@dataclass
class Divergence:
    """A declared divergence: where it was declared, where the bad streak began, and what went bad."""

    step: int          # the step at which it was declared
    onset: int         # the first bad step of the streak
    metric: str
    value: float

    def message(self) -> str:
        """One line for the log and the error: the step, the bad metric and value, and the onset."""
        return (f"training diverged at step {self.step}: {self.metric} = {self.value:.4g} "
                f"(bad since step {self.onset})")


class DivergenceDetector:
    """Counts consecutive bad steps (non-finite or beyond threshold) and declares divergence after `patience`."""

    def __init__(self, max_abs_energy: float = math.inf, max_energy_gap: float = math.inf, patience: int = 5):
        self.max_abs_energy, self.max_energy_gap, self.patience = max_abs_energy, max_energy_gap, patience
        self.streak = 0
        self.onset: int | None = None
        self.last_problem: tuple[str, float] | None = None

    @property
    def in_bad_streak(self) -> bool:
        """True while the last recorded step was bad."""
        return self.streak > 0

    def check(self, step: int, energy_pos: float, energy_neg: float, grads_finite: bool = True,
              weights_finite: bool = True) -> Divergence | None:
        """Record one energy-training step; returns a `Divergence` once `patience` bad steps ran in a row."""
        return self.record(step, self._energy_problem(energy_pos, energy_neg, grads_finite, weights_finite))

    def check_finite(self, step: int, loss: float, grads_finite: bool = True,
                     weights_finite: bool = True) -> Divergence | None:
        """Record one step judged by finiteness alone (NVAE pretraining)."""
        if not math.isfinite(loss):
            return self.record(step, ("non-finite loss", loss))
        return self.record(step, _finiteness_problem(grads_finite, weights_finite))

    def record(self, step: int, problem: tuple[str, float] | None) -> Divergence | None:
        """Count a bad step (`problem` = (metric, value)) or end a streak (None)."""
        if problem is None:
            self.streak, self.onset, self.last_problem = 0, None, None
            return None
        self.streak += 1
        self.onset = step if self.onset is None else self.onset
        self.last_problem = problem
        if self.streak >= self.patience:
            return Divergence(step=step, onset=self.onset, metric=problem[0], value=problem[1])
        return None

    def unfinished_streak(self, step: int) -> Divergence | None:
        """At the end of training: a streak still running means the run cannot end cleanly (its last steps are
        bad and were not checkpointed), so it counts as a divergence however short the streak."""
        if not self.in_bad_streak:
            return None
        metric, value = self.last_problem
        return Divergence(step=step, onset=self.onset, metric=metric, value=value)

    def _energy_problem(self, energy_pos: float, energy_neg: float, grads_finite: bool,
                        weights_finite: bool) -> tuple[str, float] | None:
        if not (math.isfinite(energy_pos) and math.isfinite(energy_neg)):
            return ("non-finite energy", energy_pos if not math.isfinite(energy_pos) else energy_neg)
        finiteness = _finiteness_problem(grads_finite, weights_finite)
        if finiteness is not None:
            return finiteness
        if max(abs(energy_pos), abs(energy_neg)) > self.max_abs_energy:
            return ("|energy|", max(abs(energy_pos), abs(energy_neg)))
        if abs(energy_pos - energy_neg) > self.max_energy_gap:
            return ("|energy_pos - energy_neg|", abs(energy_pos - energy_neg))
        return None

    def state_dict(self) -> dict:
        """The streak and its onset, for a checkpoint's state.json."""
        return {"streak": self.streak, "onset": self.onset}

    def load_state_dict(self, state: dict) -> None:
        """Restore from a checkpoint's state.json (validated: a garbled entry is a one-line error upstream)."""
        streak, onset = state["streak"], state["onset"]
        if not isinstance(streak, int) or streak < 0 or not (onset is None or isinstance(onset, int)):
            raise ValueError(f"bad divergence state {str(state)[:80]}")
        self.streak, self.onset = streak, onset


def _finiteness_problem(grads_finite: bool, weights_finite: bool) -> tuple[str, float] | None:
    if not grads_finite:
        return ("non-finite gradient", float("nan"))
    if not weights_finite:
        return ("non-finite weights", float("nan"))
    return None


def stop_diverged(divergence: Divergence, run_dir: Path, accelerator, log, hint: str = "") -> None:
    """Stop a diverged run, on every process: mark it, drop checkpoints from the bad streak on (none are written
    in it) and raise `TrainingDiverged` with the one line the user sees last. `hint`: which settings to change."""
    from trainer.run.rundir import mark_diverged

    if accelerator.is_main_process:
        mark_diverged(run_dir, divergence)
    settings = f"changed settings ({hint})" if hint else "changed settings"
    message = (f"{divergence.message()}; stopped. The run is marked diverged; checkpoints before step "
               f"{divergence.onset} are kept. Resume from one with {settings}: --resume-from CHECKPOINT")
    log(message)
    accelerator.wait_for_everyone()
    raise TrainingDiverged(message)
