"""toy-likelihood: exact test log-likelihoods of a VAE and of VAEBM on 25-Gaussians (VAEBM §5.4).

    python scripts/evaluate.py toy-likelihood [--quick] --out toy.json --run-dir runs/eval/toy

Per seed (full mode: 3 seeds, --seed, --seed+1, --seed+2; quick: 1):
1. Train the MLP VAE (preset nvae/toy2d: encoder and decoder 4 × 256, 20-d latent) with the NVAE trainer, then
   two energy MLPs on it (preset vaebm/toy2d: 4 × 256) with the VAEBM trainer: one with the project's Langevin
   sampler in ε-space (the method), and a reference with exact negatives (`langevin.negatives=resample`:
   importance resampling of --reference-pool VAE samples by exp(−E), possible in 2-D only; the flag wins over an
   --ebm-override of langevin.resample_pool). The reference shows what the objective reaches, so any gap
   between the sampler and the objective is visible on every run.
2. On held-out points from the true mixture, per sample, in nats:
   - true_ll              the exact log-density of the mixture (true_ll_expected: its analytic expectation);
   - vae_ll               log p_vae(x) by importance weighting (IWAE) with --iwae-samples posterior samples;
   - vaebm_ll             log p_vae(x) − E(x) − log Z, with log Z = log E_{x~p_vae}[exp(−E(x))] by Monte Carlo
                          over --log-z-samples VAE samples (log_z, its delta-method log_z_stderr and the
                          effective sample size log_z_ess);
   - vaebm_ll_grid        the same with log Z integrated on a grid (log_z_grid; IWAE at every cell centre);
   - vaebm_reference_ll   vaebm_ll of the reference energy (and reference_log_z*, vaebm_reference_ll_grid).
3. Density images (PNG and TensorBoard, with --run-dir; first seed) of samples from the truth, the VAE, VAEBM by
   Langevin in ε-space (the preset's test-time steps) and VAEBM by resampling the VAE samples with weights
   exp(−E) (the trained density itself, free of Langevin's bias): the paper's Figure 4.

The JSON holds the means over seeds of every per-seed value, with `<key>_seed_stderr` (standard error across
seeds) when there are several, and `per_seed`, each seed's full results. Paper: VAE −2.97, VAEBM −1.50, true
−1.10 nats (100,000 test points, 10,000 IWAE samples). With --run-dir, re-running reuses the trained models.
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
    summarize_seeds,
)

PAPER = {"paper_vae_ll": -2.97, "paper_vaebm_ll": -1.50, "paper_true_ll": -1.10}
PLOT_EXTENT = 3.0  # the density images show [−3, 3]²: the modes sit at −2 … 2


@dataclass
class Settings:
    """Sizes of the experiment's trainings and evaluations (QUICK and FULL, overridable by flags)."""

    vae_steps: int | None          # NVAE-trainer steps for the MLP VAE (None: the preset's train.max_steps)
    ebm_steps: int | None          # VAEBM-trainer steps for the energy (None: the preset's)
    test_points: int               # held-out points from the true mixture
    iwae_samples: int              # posterior samples per test point for log p_vae(x)
    log_z_samples: int             # VAE samples for the Monte Carlo log Z
    grid_step: float               # cell side of the numerical-integration cross-check (0: skip it)
    grid_extent: float             # the grid covers [−extent, extent]²
    grid_iwae_samples: int         # posterior samples per grid point
    plot_points: int               # samples per density image (and per sample-quality figure)
    seeds: int                     # seeds --seed, --seed+1, ... (each trains its own VAE and energies)
    reference_pool: int            # VAE proposals resampled per batch of the reference's exact negatives


FULL = Settings(vae_steps=None, ebm_steps=None, test_points=10_000, iwae_samples=2_000, log_z_samples=1_000_000,
                grid_step=0.025, grid_extent=3.5, grid_iwae_samples=200, plot_points=20_000, seeds=3,
                reference_pool=16_384)
# Quick mode trains the energies for half the preset's 3,000 iterations, to fit in 10 minutes.
QUICK = Settings(vae_steps=None, ebm_steps=1_500, test_points=2_000, iwae_samples=500, log_z_samples=200_000,
                 grid_step=0.05, grid_extent=3.5, grid_iwae_samples=50, plot_points=5_000, seeds=1,
                 reference_pool=4_096)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the experiment's options: each setting, training overrides and the reference switch."""
    for item in fields(Settings):
        flag = "--" + item.name.replace("_", "-")
        kind = float if item.name in ("grid_step", "grid_extent") else int
        parser.add_argument(flag, type=kind, default=None,
                            help=f"{item.name} (default: {getattr(FULL, item.name)} full, {getattr(QUICK, item.name)} quick)")
    parser.add_argument("--vae-override", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override for the VAE training (preset nvae/toy2d); repeatable")
    parser.add_argument("--ebm-override", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override for the energy training (preset vaebm/toy2d); repeatable")
    parser.add_argument("--no-reference", dest="reference", action="store_false",
                        help="skip the reference energy with exact negatives (its rows are then missing)")
    parser.add_argument("--langevin-steps", type=int, default=None,
                        help="Langevin steps for the VAEBM sample image (default: the preset's langevin.sample_steps)")


def resolve_settings(args: argparse.Namespace) -> Settings:
    """The settings for --quick or full with the flags applied; UserError on an out-of-range value."""
    settings = replace(QUICK if args.quick else FULL,
                       **{f.name: getattr(args, f.name) for f in fields(Settings) if getattr(args, f.name) is not None})
    for name in ("test_points", "iwae_samples", "log_z_samples", "grid_iwae_samples", "plot_points", "seeds",
                 "reference_pool"):
        if getattr(settings, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(settings, name)}")
    for name in ("vae_steps", "ebm_steps"):
        if getattr(settings, name) is not None and getattr(settings, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(settings, name)}")
    if settings.grid_step <= 0 or settings.grid_extent <= 0:
        raise UserError(f"--grid-step and --grid-extent must be > 0, got {settings.grid_step}, {settings.grid_extent}")
    return settings


def run(args: argparse.Namespace, report) -> dict:
    """Train VAE and VAEBM on 25-Gaussians per seed; returns the test log-likelihoods and their summary."""
    settings = resolve_settings(args)
    seeds = [args.seed + k for k in range(settings.seeds)]
    per_seed = [evaluate_seed(seed, settings, args, report, figures=(seed == seeds[0])) for seed in seeds]
    results = summarize(per_seed)
    results.update(seeds=seeds, per_seed=per_seed, test_points=settings.test_points, iwae_samples=settings.iwae_samples,
                   log_z_samples=settings.log_z_samples, **PAPER)
    verdict = "beats" if results["vaebm_ll"] > results["vae_ll"] else "does NOT beat"
    report.log(f"{len(seeds)} seed(s): true {results['true_ll']:.3f}, VAE {results['vae_ll']:.3f}, VAEBM (Langevin) "
               f"{results['vaebm_ll']:.3f}, VAEBM (exact negatives, reference) "
               f"{results.get('vaebm_reference_ll', float('nan')):.3f} nats: VAEBM {verdict} the VAE")
    return results


# Per-seed values averaged in the summary (each with <key>_seed_stderr across seeds when there are several).
SUMMARY_KEYS = ("true_ll", "vae_ll", "vaebm_ll", "vaebm_ll_grid", "vaebm_reference_ll", "vaebm_reference_ll_grid",
                "vaebm_gain", "log_z", "log_z_grid", "log_z_ess", "reference_log_z", "reference_log_z_grid",
                "vae_log_mass_grid", "vae_near_mode", "vaebm_langevin_near_mode", "vaebm_resampled_near_mode",
                "true_near_mode")


def summarize(per_seed: list[dict]) -> dict:
    """Means over seeds of the per-seed values; with several seeds, their standard errors (`*_seed_stderr`).
    With one seed the per-point standard errors of that seed are kept (`*_stderr`)."""
    results = summarize_seeds(per_seed, SUMMARY_KEYS)
    if len(per_seed) == 1:
        results.update({k: v for k, v in per_seed[0].items() if k.endswith("_stderr")})
    results["train_seconds"] = round(sum(row["vae_train_seconds"] + row["ebm_train_seconds"]
                                         + row["reference_train_seconds"] for row in per_seed), 1)
    return results


def evaluate_seed(seed: int, settings: Settings, args: argparse.Namespace, report, figures: bool) -> dict:
    """Train the VAE, the energy with Langevin negatives and the reference energy with exact negatives for one
    seed, and measure all of them on the same held-out points."""
    from trainer.ebm.sources import load_frozen_vae, load_trained_energy

    truth = Gaussians25()
    generator = torch.Generator().manual_seed(derive_seed(seed, "toy-likelihood-eval"))
    vae_dir, ebm_dir, reference_dir, results = train_models(report, seed, settings, args.vae_override,
                                                            args.ebm_override, args.reference)
    vae, _ = load_frozen_vae(vae_dir, "ema", "cpu")
    energy = load_trained_energy(ebm_dir, "cpu")
    energies = [("", energy)]
    if reference_dir is not None:
        energies.append(("reference_", load_trained_energy(reference_dir, "cpu")))
    started = time.perf_counter()

    # Held-out test points: exact, IWAE and energy-corrected log-likelihoods of the same points.
    test = truth.sample(settings.test_points, torch.Generator().manual_seed(derive_seed(seed, "toy-test")))
    report.log(f"seed {seed}: IWAE log p_vae on {settings.test_points} test points x {settings.iwae_samples} samples")
    log_p_true = truth.log_prob(test.double())
    log_p_vae = iwae(vae, test, settings.iwae_samples, generator)
    few = max(1, settings.iwae_samples // 10)
    results.update(vae_ll_few_samples=float(iwae(vae, test, few, generator).mean()), iwae_few_samples=few)
    for key, values in (("true_ll", log_p_true), ("vae_ll", log_p_vae)):
        results[key], results[f"{key}_stderr"] = mean_and_stderr(values)

    report.log(f"seed {seed}: log Z by Monte Carlo over {settings.log_z_samples} VAE samples and on a grid")
    vae_points = vae_samples(vae, settings.log_z_samples, generator)
    grid, cell_area = square_grid(settings.grid_extent, settings.grid_step)
    log_p_grid = iwae(vae, grid, settings.grid_iwae_samples, generator)
    results.update(vae_log_mass_grid=log_integral_on_grid(log_p_grid, cell_area), grid_cells=len(grid),
                   vae_mass_outside_grid=float((vae_points.abs() > settings.grid_extent).any(dim=1).double().mean()))
    for prefix, net in energies:
        name = "vaebm_reference" if prefix else "vaebm"
        energy_test = chunked(net, test, 65_536).double()
        vae_energies = chunked(net, vae_points, 65_536).double()
        log_z = log_partition_from_base_samples(vae_energies)
        log_z_grid = log_integral_on_grid(log_p_grid - chunked(net, grid, 65_536).double(), cell_area)
        results[f"{name}_ll"], results[f"{name}_ll_stderr"] = mean_and_stderr(log_p_vae - energy_test - log_z.value)
        results[f"{name}_ll_grid"] = float((log_p_vae - energy_test).mean()) - log_z_grid
        results.update({f"{prefix}log_z": log_z.value, f"{prefix}log_z_stderr": log_z.stderr,
                        f"{prefix}log_z_ess": log_z.ess, f"{prefix}log_z_grid": log_z_grid})
        if not prefix:
            gain = -energy_test - log_z.value  # vaebm_ll − vae_ll point by point: free of the IWAE error
            results["vaebm_gain"], gain_stderr = mean_and_stderr(gain)
            results["vaebm_gain_stderr"] = math.hypot(gain_stderr, log_z.stderr)
            results["mean_energy_test"] = float(energy_test.mean())
            weights = torch.softmax(-vae_energies, 0)
            results["vaebm_mass_outside_grid"] = float(weights[(vae_points.abs() > settings.grid_extent).any(1)].sum())
    results.update(sample_figures(truth, vae, energy, vae_points, ebm_dir, settings, args, seed, generator, report,
                                  figures))
    results["eval_seconds"] = round(time.perf_counter() - started, 1)
    reference_ll = results.get("vaebm_reference_ll", float("nan"))
    report.log(f"seed {seed}: true {results['true_ll']:.3f}, VAE {results['vae_ll']:.3f}, VAEBM {results['vaebm_ll']:.3f} "
               f"(log Z {results['log_z']:.3f} ± {results['log_z_stderr']:.3f}, grid {results['log_z_grid']:.3f}, "
               f"ESS {results['log_z_ess']:.0f}), reference {reference_ll:.3f} nats")
    return {"seed": seed, **results}


# ----------------------------------------------------------------------------------------------
# Training through the project's trainers (`train_models`: presets + dotted overrides, as the scripts do).


def train_models(report, seed: int, settings: Settings, vae_overrides: list[str], ebm_overrides: list[str],
                 reference: bool = True) -> tuple[Path, Path, Path | None, dict]:
    """Train the MLP VAE, then on it the energy with the preset's Langevin negatives and a reference energy with
    exact negatives (`langevin.negatives=resample`, otherwise the same settings); (VAE run, energy run,
    reference run, timings). A diverged energy is an error."""
    from trainer.evaluation.train_models import train_nvae_run, train_vaebm_run

    models_dir = report.work_dir("models")
    common = [f"train.seed={seed}"]
    clock = [time.perf_counter()]

    def lap() -> float:
        clock.append(time.perf_counter())
        return round(clock[-1] - clock[-2], 1)

    vae_run = train_nvae_run("toy2d", [*common, *_steps(settings.vae_steps), *vae_overrides], models_dir, report.log)
    timings = {"vae_train_seconds": lap()}
    energy = [*common, *_steps(settings.ebm_steps), *ebm_overrides]
    ebm_run = train_vaebm_run("toy2d", vae_run, energy, models_dir, report.log)
    timings["ebm_train_seconds"] = lap()
    reference_run = None
    if reference:
        exact = ["langevin.negatives=resample", f"langevin.resample_pool={settings.reference_pool}",
                 "langevin.start_pool=1"]  # exact negatives need no chain starts
        reference_run = train_vaebm_run("toy2d", vae_run, [*energy, *exact], models_dir, report.log)
    timings["reference_train_seconds"] = lap()
    return vae_run, ebm_run, reference_run, timings


def _steps(steps: int | None) -> list[str]:
    return [f"train.max_steps={steps}"] if steps else []


# ----------------------------------------------------------------------------------------------
# Evaluation pieces.


def iwae(vae, points: torch.Tensor, samples: int, generator: torch.Generator, block: int = 1024) -> torch.Tensor:
    """IWAE estimate of log p_vae(x) [N] for points [N, 2], in float64."""
    return chunked(lambda x: vae.log_likelihood(x, samples, generator=generator), points, block).double()


@torch.no_grad()
def vae_samples(vae, n: int, generator: torch.Generator, block: int = 65_536) -> torch.Tensor:
    """n samples of the VAE at temperature 1 (decoder samples) [n, 2]."""
    return torch.cat([vae.sample(min(block, n - start), generator=generator).x_sample for start in range(0, n, block)])


def sample_figures(truth, vae, energy, vae_points, ebm_dir: Path, settings: Settings, args, seed: int, generator,
                   report, figures: bool) -> dict:
    """Samples of the truth, the VAE and VAEBM (Langevin in ε-space, and exact resampling of the VAE samples by
    exp(−E)): their share near a mode, and (`figures`) their density images, the paper's Figure 4."""
    from trainer.config.loader import read_yaml

    n = settings.plot_points
    langevin_cfg = read_yaml(ebm_dir / "config.yaml")["langevin"]
    steps = args.langevin_steps if args.langevin_steps is not None else langevin_cfg["sample_steps"]
    report.log(f"seed {seed}: VAEBM samples, {n} chains x {steps} Langevin steps (step size {langevin_cfg['step_size']})")
    with torch.no_grad():
        weights = torch.softmax(-chunked(energy, vae_points, 65_536).double(), 0)
    samples = {
        "true": truth.sample(n, generator),
        "vae": vae_points[:n],
        "vaebm_langevin": vaebm_langevin_samples(vae, energy, n, steps, langevin_cfg["step_size"],
                                                 derive_seed(seed, "toy-langevin"),
                                                 metropolis=langevin_cfg.get("metropolis", False)),
        "vaebm_resampled": vae_points[torch.multinomial(weights, n, True, generator=generator)],
    }
    results = {"langevin_sample_steps": steps}
    for name, points in samples.items():
        if figures:
            report.scatter(f"samples_{name}", points, PLOT_EXTENT)
        results[f"{name}_near_mode"] = near_mode_fraction(truth, points)
    # How evenly each model spreads its mass over the 25 modes (0.04 each for the truth): an energy whose
    # wells have unequal depths loses likelihood on the shallow modes even when its samples look good.
    for name, w in (("vae", None), ("vaebm", weights)):
        shares = mode_shares(truth, vae_points, w)
        results[f"{name}_mode_share_min"], results[f"{name}_mode_share_max"] = float(shares.min()), float(shares.max())
    return results


def vaebm_langevin_samples(vae, energy, n: int, steps: int, step_size: float, seed: int,
                           block: int = 4_096, metropolis: bool = False) -> torch.Tensor:
    """VAEBM samples [n, 2]: chains from VAE noise, `steps` Langevin steps in ε-space, decoder samples.
    Chain i depends only on (seed, i)."""
    adapter = VAEBMEnergy(vae, energy, temperature=1.0)
    out = []
    for start in range(0, n, block):
        _, final = seeded_chains(adapter, start, min(block, n - start), seed=seed, steps=steps, step_size=step_size,
                                 metropolis=metropolis)
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
