"""Likelihood metrics for small energy-refined models: partition functions and exact test log-likelihoods.

A VAEBM (or any energy tilt of a base model) has the density

    p(x) = p_base(x) · exp(−E(x)) / Z,        Z = ∫ p_base(x) · exp(−E(x)) dx = E_{x~p_base}[exp(−E(x))],

so its test log-likelihood is log p_base(x) − E(x) − log Z. Two ways to get log Z, both here:

- `log_mean_exp(−E(x_i))` over samples x_i ~ p_base: Monte Carlo, unbiased for Z, with a delta-method
  standard error for log Z. Works in any dimension (a latent-space tilt of a prior uses it unchanged).
- `log_integral_on_grid(log f(grid), cell_area)` with log f = log p_base − E: the midpoint rule over a
  square grid (`square_grid`), for 2-D data where a grid can cover the mass.

`chunked` evaluates a per-point function in blocks so a million points never sit in one batch, and
`summarize_seeds` turns an experiment's per-seed results into means with standard errors across seeds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch


@dataclass(frozen=True)
class LogEstimate:
    """An estimate of log Z with its standard error and the effective sample size of the weights."""

    value: float
    stderr: float
    ess: float  # (Σw)² / Σw²: how many equally weighted samples the weights are worth


def log_mean_exp(log_weights: torch.Tensor) -> LogEstimate:
    """log((1/N) Σ_i exp(log w_i)) for log_weights [N], computed in float64 after shifting by the max.

    Standard error by the delta method: Var(log Ẑ) ≈ Var(Ẑ)/Ẑ² with Var(Ẑ) = Var(w)/N, i.e.
    stderr = std(w) / (√N · mean(w)). Trustworthy only when the ESS is not tiny: with heavy-tailed
    weights both the estimate and its error bar are too small.
    """
    log_w = log_weights.detach().double().flatten()
    n = log_w.numel()
    if n == 0:
        raise ValueError("log_mean_exp needs at least one weight")
    if not torch.isfinite(log_w).all():
        raise ValueError("log_mean_exp got non-finite log-weights")
    shift = log_w.max()
    w = torch.exp(log_w - shift)  # in (0, 1], the largest exactly 1
    mean = w.mean()
    stderr = float(w.std(unbiased=True) / (math.sqrt(n) * mean)) if n > 1 else float("inf")
    ess = float(w.sum() ** 2 / (w * w).sum())
    return LogEstimate(value=float(shift + torch.log(mean)), stderr=stderr, ess=ess)


def log_partition_from_base_samples(energies: torch.Tensor) -> LogEstimate:
    """log Z = log E_{x~p_base}[exp(−E(x))] from energies [N] of samples of the base model."""
    return log_mean_exp(-energies)


def square_grid(extent: float, step: float) -> tuple[torch.Tensor, float]:
    """Cell centres of a square grid over [−extent, extent]² with cells of side `step`.

    Returns (points [G, 2] float32, cell area). The number of cells per axis is rounded up, so the
    grid covers at least the requested square.
    """
    if extent <= 0 or step <= 0:
        raise ValueError(f"grid needs extent > 0 and step > 0, got extent={extent}, step={step}")
    cells = math.ceil(2 * extent / step)
    half = cells * step / 2
    axis = torch.arange(cells, dtype=torch.float64) * step - half + step / 2
    return torch.cartesian_prod(axis, axis).float(), step * step


def log_integral_on_grid(log_values: torch.Tensor, cell_area: float) -> float:
    """log ∫ f ≈ log(Σ_g f(x_g) · cell_area) from log f at the cell centres [G] (the midpoint rule)."""
    log_values = log_values.detach().double().flatten()
    return float(torch.logsumexp(log_values, dim=0) + math.log(cell_area))


def mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    """The mean of per-sample values [N] and its standard error std/√N."""
    values = values.detach().double().flatten()
    if values.numel() < 2:
        return float(values.mean()), float("inf")
    return float(values.mean()), float(values.std(unbiased=True) / math.sqrt(values.numel()))


@torch.no_grad()
def chunked(fn: Callable[[torch.Tensor], torch.Tensor], points: torch.Tensor, block: int) -> torch.Tensor:
    """fn applied to `points` [N, ...] in blocks of `block` rows, concatenated: [N, ...] (no gradients)."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    return torch.cat([fn(points[start:start + block]) for start in range(0, points.shape[0], block)])


def summarize_seeds(per_seed: list[dict], keys: Iterable[str]) -> dict[str, float]:
    """Means over seeds of the per-seed values of `keys` (keys a seed lacks are averaged over the others, keys no
    seed has are left out) and, with several seeds, their standard errors across seeds, `<key>_seed_stderr`."""
    results = {}
    for key in keys:
        values = torch.tensor([row[key] for row in per_seed if key in row], dtype=torch.float64)
        if len(values) == 0:
            continue
        results[key] = float(values.mean())
        if len(values) > 1:
            results[f"{key}_seed_stderr"] = float(values.std(unbiased=True) / math.sqrt(len(values)))
    return results
