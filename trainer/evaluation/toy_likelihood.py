"""toy-likelihood: exact test log-likelihoods of a VAE and of VAEBM on 25-Gaussians (VAEBM §5.4).

    python scripts/evaluate.py toy-likelihood --quick --out toy.json --run-dir runs/eval/toy

1. Train the MLP VAE (preset nvae/toy2d: encoder and decoder 4 × 256, 20-d latent) with the NVAE
   trainer, then an energy MLP (preset vaebm/toy2d: 4 × 256) on it with the VAEBM trainer.
2. On held-out points from the true mixture, per sample, in nats:
   - true_ll   the exact log-density of the mixture (true_ll_expected: its analytic expectation);
   - vae_ll    log p_vae(x) by importance weighting (IWAE) with --iwae-samples posterior samples;
   - vaebm_ll  log p_vae(x) − E(x) − log Z, with the same IWAE estimate of log p_vae(x) and
               log Z = log E_{x~p_vae}[exp(−E(x))] by Monte Carlo over --log-z-samples VAE samples
               (log_z, its delta-method log_z_stderr and the effective sample size log_z_ess).
   As a cross-check, Z is also integrated numerically over a grid (log_z_grid, from IWAE on the grid
   points), with the VAE's own mass on that grid (vae_log_mass_grid, ≈ 0 when grid and IWAE are good).
3. Density images (PNG and TensorBoard, with --run-dir) of samples from the truth, the VAE, VAEBM by
   Langevin in ε-space (the project's sampler, the preset's test-time steps) and VAEBM by resampling
   the VAE samples with weights exp(−E) (the trained density itself, free of Langevin's bias).

Paper: VAE −2.97, VAEBM −1.50, true −1.10 nats (100,000 test points, 10,000 IWAE samples). With
--run-dir, re-running reuses (resumes) the trained models there; use a new folder when changing settings.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from data.stream import derive_seed
from data.toy2d import Gaussians25
from models.adapters import VAEBMEnergy
from models.langevin import seeded_chains
from trainer.errors import UserError
from trainer.evaluation.toy_metrics import (
    chunked,
    log_integral_on_grid,
    log_partition_from_base_samples,
    mean_and_stderr,
    square_grid,
)

PAPER = {"paper_vae_ll": -2.97, "paper_vaebm_ll": -1.50, "paper_true_ll": -1.10}
PLOT_EXTENT = 3.0  # the density images show [−3, 3]²: the modes sit at −2 … 2


@dataclass
class Settings:
    vae_steps: int | None          # NVAE-trainer steps for the MLP VAE (None: the preset's train.max_steps)
    ebm_steps: int | None          # VAEBM-trainer steps for the energy (None: the preset's)
    test_points: int               # held-out points from the true mixture
    iwae_samples: int              # posterior samples per test point for log p_vae(x)
    log_z_samples: int             # VAE samples for the Monte Carlo log Z
    grid_step: float               # cell side of the numerical-integration cross-check (0: skip it)
    grid_extent: float             # the grid covers [−extent, extent]²
    grid_iwae_samples: int         # posterior samples per grid point
    plot_points: int               # samples per density image (and per sample-quality figure)


FULL = Settings(vae_steps=None, ebm_steps=None, test_points=10_000, iwae_samples=2_000, log_z_samples=1_000_000,
                grid_step=0.025, grid_extent=3.5, grid_iwae_samples=200, plot_points=20_000)
QUICK = Settings(vae_steps=None, ebm_steps=None, test_points=2_000, iwae_samples=500, log_z_samples=200_000,
                 grid_step=0.05, grid_extent=3.5, grid_iwae_samples=50, plot_points=5_000)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for item in fields(Settings):
        flag = "--" + item.name.replace("_", "-")
        kind = float if item.name in ("grid_step", "grid_extent") else int
        parser.add_argument(flag, type=kind, default=None,
                            help=f"{item.name} (default: {getattr(FULL, item.name)} full, {getattr(QUICK, item.name)} quick)")
    parser.add_argument("--vae-override", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override for the VAE training (preset nvae/toy2d); repeatable")
    parser.add_argument("--ebm-override", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override for the energy training (preset vaebm/toy2d); repeatable")
    parser.add_argument("--langevin-steps", type=int, default=None,
                        help="Langevin steps for the VAEBM sample image (default: the preset's langevin.sample_steps)")


def resolve_settings(args: argparse.Namespace) -> Settings:
    settings = replace(QUICK if args.quick else FULL,
                       **{f.name: getattr(args, f.name) for f in fields(Settings) if getattr(args, f.name) is not None})
    for name in ("test_points", "iwae_samples", "log_z_samples", "grid_iwae_samples", "plot_points"):
        if getattr(settings, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(settings, name)}")
    for name in ("vae_steps", "ebm_steps"):
        if getattr(settings, name) is not None and getattr(settings, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(settings, name)}")
    if settings.grid_step < 0 or settings.grid_extent <= 0:
        raise UserError(f"--grid-step must be >= 0 and --grid-extent > 0, got {settings.grid_step}, {settings.grid_extent}")
    return settings


def run(args: argparse.Namespace, report) -> dict:
    settings = resolve_settings(args)
    truth = Gaussians25()
    generator = torch.Generator().manual_seed(derive_seed(args.seed, "toy-likelihood-eval"))
    results: dict = {}

    vae_dir, ebm_dir, timings = train_models(report, args.seed, settings, args.vae_override, args.ebm_override)
    results.update(timings)

    from trainer.ebm.sources import load_frozen_vae, load_trained_energy

    vae, _ = load_frozen_vae(vae_dir, "ema", "cpu")
    energy = load_trained_energy(ebm_dir, "cpu")
    started = time.perf_counter()

    # Held-out test points: exact, IWAE and energy-corrected log-likelihoods of the same points.
    test = truth.sample(settings.test_points, torch.Generator().manual_seed(derive_seed(args.seed, "toy-test")))
    report.log(f"IWAE log p_vae on {settings.test_points} test points x {settings.iwae_samples} samples")
    log_p_true = truth.log_prob(test.double())
    log_p_vae = iwae(vae, test, settings.iwae_samples, generator)
    few = max(1, settings.iwae_samples // 10)
    log_p_vae_few = iwae(vae, test, few, generator)
    energy_test = chunked(energy, test, 65_536).double()

    report.log(f"log Z by Monte Carlo over {settings.log_z_samples} VAE samples")
    vae_points, vae_energies = vae_samples_and_energies(vae, energy, settings.log_z_samples, generator)
    log_z = log_partition_from_base_samples(vae_energies)
    vaebm_per_point = log_p_vae - energy_test - log_z.value
    gain = -energy_test - log_z.value  # vaebm_ll − vae_ll, point by point: free of the IWAE error

    for key, values in (("true_ll", log_p_true), ("vae_ll", log_p_vae), ("vaebm_ll", vaebm_per_point),
                        ("vaebm_gain", gain)):
        mean, stderr = mean_and_stderr(values)
        results[key], results[f"{key}_stderr"] = mean, stderr
    results["vaebm_gain_stderr"] = math.hypot(results["vaebm_gain_stderr"], log_z.stderr)
    results.update(log_z=log_z.value, log_z_stderr=log_z.stderr, log_z_ess=log_z.ess,
                   log_z_method="monte carlo over VAE samples", true_ll_expected=truth.expected_log_prob(),
                   vae_ll_few_samples=float(log_p_vae_few.double().mean()), iwae_few_samples=few,
                   mean_energy_test=float(energy_test.mean()))

    if settings.grid_step > 0:
        results.update(grid_cross_check(vae, energy, settings, generator, vae_points, vae_energies, report))
        results["vaebm_ll_grid"] = float((log_p_vae - energy_test).mean()) - results["log_z_grid"]

    results.update(sample_figures(truth, vae, energy, vae_points, vae_energies, ebm_dir, settings, args, generator, report))
    results["eval_seconds"] = round(time.perf_counter() - started, 1)
    results.update(test_points=settings.test_points, iwae_samples=settings.iwae_samples,
                   log_z_samples=settings.log_z_samples, **PAPER)
    verdict = "beats" if results["vaebm_ll"] > results["vae_ll"] else "does NOT beat"
    report.log(f"true {results['true_ll']:.3f}, VAE {results['vae_ll']:.3f}, VAEBM {results['vaebm_ll']:.3f} nats "
               f"(log Z {log_z.value:.4f} ± {log_z.stderr:.4f}): VAEBM {verdict} the VAE")
    return results


# ----------------------------------------------------------------------------------------------
# Training through the project's trainers (`train_models`: presets + dotted overrides, as the scripts do).


def train_models(report, seed: int, settings: Settings, vae_overrides: list[str], ebm_overrides: list[str]) -> tuple[Path, Path, dict]:
    """Train the MLP VAE, then the energy on it; (VAE run, energy run, timings). A diverged energy is an error."""
    from trainer.evaluation.train_models import train_nvae_run, train_vaebm_run

    models_dir = report.work_dir("models")
    common = [f"train.seed={seed}"]
    started = time.perf_counter()
    vae_run = train_nvae_run("toy2d", [*common, *_steps(settings.vae_steps), *vae_overrides], models_dir, report.log)
    middle = time.perf_counter()
    ebm_run = train_vaebm_run("toy2d", vae_run, [*common, *_steps(settings.ebm_steps), *ebm_overrides], models_dir,
                              report.log)
    timings = {"vae_train_seconds": round(middle - started, 1), "ebm_train_seconds": round(time.perf_counter() - middle, 1)}
    return vae_run, ebm_run, timings


def _steps(steps: int | None) -> list[str]:
    return [f"train.max_steps={steps}"] if steps else []


# ----------------------------------------------------------------------------------------------
# Evaluation pieces.


def iwae(vae, points: torch.Tensor, samples: int, generator: torch.Generator, block: int = 1024) -> torch.Tensor:
    """IWAE estimate of log p_vae(x) [N] for points [N, 2], in float64."""
    return chunked(lambda x: vae.log_likelihood(x, samples, generator=generator), points, block).double()


@torch.no_grad()
def vae_samples_and_energies(vae, energy, n: int, generator: torch.Generator,
                             block: int = 65_536) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples of the VAE at temperature 1 (decoder samples) [n, 2] and their energies [n]."""
    points, energies = [], []
    for start in range(0, n, block):
        x = vae.sample(min(block, n - start), generator=generator).x_sample
        points.append(x)
        energies.append(energy(x))
    return torch.cat(points), torch.cat(energies)


def grid_cross_check(vae, energy, settings: Settings, generator, vae_points, vae_energies, report) -> dict:
    """log Z and the VAE's log-mass by the midpoint rule over a square grid, with IWAE at every cell centre,
    and the share of the VAE's (and VAEBM's) mass outside the grid, read off the Monte Carlo samples."""
    grid, cell_area = square_grid(settings.grid_extent, settings.grid_step)
    report.log(f"grid cross-check: {len(grid)} cells x {settings.grid_iwae_samples} IWAE samples")
    log_p = iwae(vae, grid, settings.grid_iwae_samples, generator)
    grid_energy = chunked(energy, grid, 65_536).double()
    outside = (vae_points.abs() > settings.grid_extent).any(dim=1)
    weights = torch.softmax(-vae_energies.double(), dim=0)
    return {"log_z_grid": log_integral_on_grid(log_p - grid_energy, cell_area),
            "vae_log_mass_grid": log_integral_on_grid(log_p, cell_area),
            "vae_mass_outside_grid": float(outside.double().mean()),
            "vaebm_mass_outside_grid": float(weights[outside].sum()),
            "grid_cells": len(grid)}


def sample_figures(truth, vae, energy, vae_points, vae_energies, ebm_dir: Path, settings: Settings, args,
                   generator, report) -> dict:
    """Samples of the truth, the VAE and VAEBM (Langevin, and exact resampling); their share near a mode."""
    from trainer.config.loader import read_yaml

    n = settings.plot_points
    langevin_cfg = read_yaml(ebm_dir / "config.yaml")["langevin"]
    steps = args.langevin_steps if args.langevin_steps is not None else langevin_cfg["sample_steps"]
    report.log(f"VAEBM samples: {n} chains x {steps} Langevin steps (step size {langevin_cfg['step_size']})")
    samples = {
        "true": truth.sample(n, generator),
        "vae": vae_points[:n],
        "vaebm_langevin": vaebm_langevin_samples(vae, energy, n, steps, langevin_cfg["step_size"],
                                                 derive_seed(args.seed, "toy-langevin")),
        # Sampling-importance-resampling from the VAE with weights exp(−E): draws from the trained VAEBM density.
        "vaebm_resampled": vae_points[torch.multinomial(torch.softmax(-vae_energies.double(), 0), n, True, generator=generator)],
    }
    results = {"langevin_sample_steps": steps}
    for name, points in samples.items():
        report.scatter(f"samples_{name}", points, PLOT_EXTENT)
        results[f"{name}_near_mode"] = near_mode_fraction(truth, points)
    # How evenly each model spreads its mass over the 25 modes (0.04 each for the truth): an energy whose
    # wells have unequal depths loses likelihood on the shallow modes even when its samples look good.
    for name, weights in (("vae", None), ("vaebm", torch.softmax(-vae_energies.double(), 0))):
        shares = mode_shares(truth, vae_points, weights)
        results[f"{name}_mode_share_min"], results[f"{name}_mode_share_max"] = float(shares.min()), float(shares.max())
    return results


def vaebm_langevin_samples(vae, energy, n: int, steps: int, step_size: float, seed: int,
                           block: int = 4_096) -> torch.Tensor:
    """VAEBM samples [n, 2]: chains from VAE noise, `steps` Langevin steps in ε-space, decoder samples.
    Chain i depends only on (seed, i)."""
    adapter = VAEBMEnergy(vae, energy, temperature=1.0)
    out = []
    for start in range(0, n, block):
        _, final = seeded_chains(adapter, start, min(block, n - start), seed=seed, steps=steps, step_size=step_size)
        with torch.no_grad():
            out.append(adapter.negatives(final, use_mean=False))
    return torch.cat(out)


def mode_shares(truth: Gaussians25, points: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Share of the (weighted) points [N, 2] nearest to each of the 25 modes: [25], summing to 1."""
    nearest = torch.cdist(points.double(), truth.means).argmin(dim=1)
    weights = torch.ones(len(points), dtype=torch.float64) if weights is None else weights.double()
    shares = torch.zeros(len(truth.means), dtype=torch.float64).index_add_(0, nearest, weights)
    return shares / shares.sum()


def near_mode_fraction(truth: Gaussians25, points: torch.Tensor) -> float:
    """Share of points within 3 component std of the nearest mode (98.9% for the truth itself)."""
    distance = torch.cdist(points.double(), truth.means).min(dim=1).values
    return float((distance < 3 * truth.std).double().mean())
