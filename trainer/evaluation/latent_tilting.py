"""latent-tilting: a VAE vs the same VAE with its prior tilted by a data-space energy (exponential tilting §3.2).

    python scripts/evaluate.py latent-tilting --quick --out tilting.json --run-dir runs/eval/tilting

The tilted model is p(z) ∝ p(z)·exp(−E(G(z))), G the decoder mean, with x ~ p(x|z): method
`latent-tilting` of the one EBM loop (`models/adapters.py`), Langevin in ε_z only. Per dataset:

1. 2-D toys (25-Gaussians, Swiss roll): the MLP VAE of preset nvae/toy2d, then the
   tilt of preset vaebm/latent-tilting-toy2d (60 training Langevin steps at step size 0.01, energy
   regularization 0.1, 1,000 iterations, 100 Langevin steps at sampling), both with `data.dataset` set
   to the toy. Everything runs at temperature 1. Keys `<toy>_...`:
   - hq_frac: share of samples near the truth: within 3 component std of a mode (25-Gaussians), within
     3 × the data noise (0.15) of the noiseless roll curve (Swiss roll). `true_` is the truth's own share.
     Base and tilted samples come from the same chains (seed, i) of the exported bundle: the base at
     0 Langevin steps, the tilted after the preset's sample_steps in ε_z; both are decoder SAMPLES
     x = μ(z) + σ(z)·ε_x with ε_x fixed, i.e. draws of the densities whose likelihoods are reported.
     `mean_hq_frac`: the same for the decoder means G(z) (what the energy was trained on);
     `tilted_sir_hq_frac`: exact draws of the trained tilt by importance resampling of prior draws with
     weights exp(−E(G(z))), free of the short Langevin chains' bias.
   - modes (25-Gaussians only): modes holding ≥ 10% of their fair share N/25 of the high-quality samples.
   - ll: test log-likelihood per point in nats on held-out points: true_ll exact (Swiss roll by
     quadrature along the curve), base_ll by IWAE, tilted_ll = IWAE with the tilt in the weight − log Z,
     log Z = log E_{p(z)}[exp(−E(G(z)))] by Monte Carlo (`tilting_metrics.py`), with standard errors.
   The 25-Gaussians numbers are also given without prefix (base_hq_frac, tilted_modes, base_ll, ...).
2. digits (16×16, `digits-train`): the NVAE of preset nvae/digits16, then vaebm/latent-tilting-digits grown
   down to 16×16 (energy layout digits16). Digit-feature Fréchet distance to the held-out `digits-test`
   (the `fd-digits` measure; decoder means) of NVAE samples (digits_base_fd: the same chains at 0 steps,
   with the trained BN statistics the tilt runs with; digits_base_bn_readjusted_fd: NVAE's own sampler,
   BN readjusted at temperature 1) and of the tilted NVAE (digits_tilted_fd). Lower is better.

Density images and sample grids go to --run-dir. `--quick` trains less and draws fewer samples (every
setting is in the JSON, with `cpu_seconds`: on one thread about the wall time on an idle machine).
With --run-dir (or --models-dir), re-running reuses the finished trainings there.
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from data.stream import derive_seed
from data.toy2d import make_toy
from trainer.errors import UserError
from trainer.evaluation import tilting_metrics as tm
from trainer.evaluation.toy_metrics import log_partition_from_base_samples, mean_and_stderr

TOYS = {"gaussians": "25gaussians", "swissroll": "swissroll"}  # key prefix → data.dataset
PLOT_EXTENT = {"gaussians": 3.0, "swissroll": 3.2}  # modes at −2 … 2; the roll reaches radius 2.83
ALIASED = ("base_hq_frac", "tilted_hq_frac", "base_modes", "tilted_modes", "base_ll", "tilted_ll", "true_ll",
           "log_z", "log_z_stderr")  # 25-Gaussians keys also reported without prefix (issue #6)
DIGIT_SIZE = 16


@dataclass
class Settings:
    vae_steps: int | None                   # MLP VAE training steps (None: nvae/toy2d's train.max_steps)
    ebm_steps: int | None                   # tilt training iterations (None: the preset's 1,000)
    ebm_batch: int | None                   # tilt batch size (None: the preset's 256)
    ebm_langevin_steps: int | None          # Langevin steps per training iteration (None: the preset's 60)
    sample_steps: int | None                # Langevin steps at sampling (None: the preset's 100)
    samples: int                            # toy samples per model (hq, modes, density images)
    test_points: int                        # held-out toy points for the log-likelihoods
    iwae_samples: int                       # posterior draws per test point
    log_z_samples: int                      # prior draws for log Z (and the resampled tilt)
    digits_nvae_steps: int                  # NVAE (nvae/digits16) training steps
    digits_ebm_steps: int                   # tilt training iterations on the NVAE
    digits_ebm_batch: int | None            # (None: the preset's 32)
    digits_ebm_langevin_steps: int | None   # (None: the preset's 60)
    digits_samples: int                     # samples per model for the Fréchet distance
    digits_sample_steps: int | None         # (None: the preset's 100)


# The toy VAE: nvae/toy2d (whose optimizer settings keep the decoder mean from collapsing: see the preset;
# a collapsed G(z) leaves a tilt nothing to move), with more steps in full mode.
FULL = Settings(vae_steps=12_000, ebm_steps=None, ebm_batch=None, ebm_langevin_steps=None, sample_steps=None,
                samples=20_000, test_points=10_000, iwae_samples=1_000, log_z_samples=1_000_000,
                digits_nvae_steps=3_000, digits_ebm_steps=300, digits_ebm_batch=None, digits_ebm_langevin_steps=None,
                digits_samples=2_000, digits_sample_steps=None)
QUICK = Settings(vae_steps=4_000, ebm_steps=200, ebm_batch=None, ebm_langevin_steps=20, sample_steps=None,
                 samples=3_000, test_points=2_000, iwae_samples=200, log_z_samples=200_000,
                 digits_nvae_steps=300, digits_ebm_steps=25, digits_ebm_batch=16, digits_ebm_langevin_steps=20,
                 digits_samples=256, digits_sample_steps=50)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for item in fields(Settings):
        parser.add_argument("--" + item.name.replace("_", "-"), type=int, default=None,
                            help=f"{item.name} (default: {getattr(FULL, item.name)} full, {getattr(QUICK, item.name)} quick)")
    parser.add_argument("--datasets", default="gaussians,swissroll",
                        help="comma-separated toys to run, from: gaussians, swissroll (default: both)")
    parser.add_argument("--skip-digits", action="store_true", help="leave out the digits part (NVAE vs tilted NVAE)")
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="trained runs and the digit classifier (default: RUN_DIR/models); shared folders reuse them")


def resolve_settings(args: argparse.Namespace) -> Settings:
    settings = replace(QUICK if args.quick else FULL,
                       **{f.name: getattr(args, f.name) for f in fields(Settings) if getattr(args, f.name) is not None})
    for name, value in asdict(settings).items():
        least = 0 if name.endswith("sample_steps") else 1  # 0 Langevin steps at sampling: the VAE itself
        if value is not None and value < least:
            raise UserError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
    return settings


def run(args: argparse.Namespace, report) -> dict:
    settings = resolve_settings(args)
    toys = [name.strip() for name in args.datasets.split(",") if name.strip()]
    unknown = [name for name in toys if name not in TOYS]
    if unknown:
        raise UserError(f"--datasets: unknown toy {unknown[0]!r}; choose from {', '.join(TOYS)}")
    models_dir = args.models_dir or report.work_dir("models")
    cpu_started = _cpu_seconds()
    applies = lambda key: (not args.skip_digits) if key.startswith("digits_") else bool(toys)
    recorded = {key: value for key, value in asdict(settings).items() if value is not None and applies(key)}
    results: dict = {"quick": bool(args.quick), "datasets": ",".join(toys), **recorded}

    for name in toys:
        toy = toy_experiment(name, settings, args.seed, models_dir, report)
        results.update({f"{name}_{key}": value for key, value in toy.items()})
        if name == "gaussians":
            results.update({key: toy[key] for key in ALIASED})
    if not args.skip_digits:
        results.update(digits_experiment(settings, args.seed, models_dir, report))
    results["cpu_seconds"] = round(_cpu_seconds() - cpu_started, 1)

    for name in toys:
        verdict = lambda key: "beats" if results[f"{name}_tilted_{key}"] > results[f"{name}_base_{key}"] else "does NOT beat"
        modes = f", modes {results['base_modes']} -> {results['tilted_modes']}" if name == "gaussians" else ""
        report.log(f"{name}: hq {results[f'{name}_base_hq_frac']:.3f} -> {results[f'{name}_tilted_hq_frac']:.3f} "
                   f"(tilt {verdict('hq_frac')} its VAE){modes}, ll {results[f'{name}_base_ll']:.3f} -> "
                   f"{results[f'{name}_tilted_ll']:.3f} (tilt {verdict('ll')} its VAE), true {results[f'{name}_true_ll']:.3f}")
    if not args.skip_digits:
        better = results["digits_tilted_fd"] < results["digits_base_fd"]
        report.log(f"digits: FD {results['digits_base_fd']:.2f} -> {results['digits_tilted_fd']:.2f} "
                   f"(tilt {'beats' if better else 'does NOT beat'} its NVAE)")
    return results


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (data workers): with OMP_NUM_THREADS=1 about
    the wall time the same work takes on an idle core, whatever else loads the machine."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


# ----------------------------------------------------------------------------------------------
# 2-D toys.


def _toy_overrides(name: str, seed: int, steps: int | None, batch: int | None = None,
                   langevin_steps: int | None = None) -> list[str]:
    overrides = [f"train.seed={seed}", f"data.dataset={TOYS[name]}"]
    overrides += [f"train.max_steps={steps}"] if steps is not None else []
    overrides += [f"train.global_batch_size={batch}", f"train.per_device_batch_size={batch}"] if batch else []
    return overrides + ([f"langevin.steps={langevin_steps}"] if langevin_steps else [])


def toy_experiment(name: str, settings: Settings, seed: int, models_dir: Path, report) -> dict:
    """Train the VAE and its tilt on one toy, then sample quality and log-likelihoods (keys unprefixed)."""
    from trainer.evaluation.train_models import sampler_for, train_nvae_run, train_vaebm_run

    started = time.perf_counter()
    vae_run = train_nvae_run("toy2d", _toy_overrides(name, seed, settings.vae_steps), models_dir, report.log)
    middle = time.perf_counter()
    tilt_run = train_vaebm_run("latent-tilting-toy2d", vae_run,
                               _toy_overrides(name, seed, settings.ebm_steps, settings.ebm_batch,
                                              settings.ebm_langevin_steps), models_dir, report.log)
    trained = time.perf_counter()
    results = {"vae_train_seconds": round(middle - started, 1), "ebm_train_seconds": round(trained - middle, 1)}

    sampler = sampler_for(tilt_run, temperatures=(), log=report.log)
    truth = make_toy(TOYS[name])
    generator = torch.Generator().manual_seed(derive_seed(seed, "latent-tilting", name))
    report.log(f"{name}: log Z over {settings.log_z_samples} prior draws")
    eps_z, prior_energy = tm.prior_energies(sampler.vae, sampler.energy_net, settings.log_z_samples, generator)
    log_z = log_partition_from_base_samples(prior_energy)
    results.update(log_z=log_z.value, log_z_stderr=log_z.stderr, log_z_ess=log_z.ess)
    results.update(sample_quality(name, truth, sampler, eps_z, prior_energy, settings, seed, generator, report))
    results.update(log_likelihoods(name, truth, sampler, log_z, settings, seed, generator, report))
    results["eval_seconds"] = round(time.perf_counter() - trained, 1)
    return results


def sample_quality(name: str, truth, sampler, eps_z: torch.Tensor, prior_energy: torch.Tensor, settings: Settings,
                   seed: int, generator: torch.Generator, report) -> dict:
    """hq fractions (and modes) of the truth, the VAE, the tilt by Langevin and the tilt by resampling.

    eps_z [M, L], prior_energy [M]: prior draws and their energies E(G(z)), resampled with weights exp(−E).
    """
    steps = sampler.defaults["steps"] if settings.sample_steps is None else settings.sample_steps
    report.log(f"{name}: {settings.samples} chains x {steps} Langevin steps")
    samples = {"true": truth.sample(settings.samples, generator),
               **draw_chains(sampler, settings.samples, steps, derive_seed(seed, "latent-tilting-chains", name))}
    chosen = torch.multinomial(torch.softmax(-prior_energy.double(), 0), settings.samples, True, generator=generator)
    eps_x = torch.randn((settings.samples, *sampler.vae.image_shape), generator=generator)
    with torch.no_grad():
        samples["tilted_sir"] = sampler.vae.decode([eps_z[chosen]], eps_x).x_sample
    quality = hq_measure(name, truth)
    results = {"sample_steps": int(steps)}
    for key, points in samples.items():
        results[f"{key}_hq_frac"] = quality(points)
        if name == "gaussians":
            results[f"{key}_modes"] = tm.modes_covered(truth, points)
        if not key.endswith("_mean"):
            report.scatter(f"{name}/samples_{key}", points, PLOT_EXTENT[name])
    return results


def log_likelihoods(name: str, truth, sampler, log_z, settings: Settings, seed: int, generator: torch.Generator,
                    report) -> dict:
    """Mean test log-likelihoods (nats per point) of the truth, the VAE and the tilt, with standard errors."""
    test = truth.sample(settings.test_points, torch.Generator().manual_seed(derive_seed(seed, "latent-tilting-test", name)))
    report.log(f"{name}: IWAE on {settings.test_points} test points x {settings.iwae_samples} posterior draws")
    log_p_base, log_p_tilt = tm.tilted_iwae(sampler.vae, sampler.energy_net, test, settings.iwae_samples, generator)
    log_p_tilt = log_p_tilt - log_z.value
    log_p_true = truth.log_prob(test.double()) if name == "gaussians" else tm.swiss_roll_log_prob(test, truth.noise)
    results = {}
    for key, values in (("true_ll", log_p_true), ("base_ll", log_p_base), ("tilted_ll", log_p_tilt),
                        ("tilted_gain", log_p_tilt - log_p_base)):  # the gain point by point: free of the test-set noise
        results[key], results[f"{key}_stderr"] = mean_and_stderr(values)
    results["tilted_gain_stderr"] = (results["tilted_gain_stderr"] ** 2 + log_z.stderr ** 2) ** 0.5
    return results


def draw_chains(sampler, n: int, steps: int, seed: int, block: int = 2_000) -> dict[str, torch.Tensor]:
    """Chains 0 … n−1 of the bundle at 0 and at `steps` Langevin steps: decoder samples and means [n, 2]."""
    out: dict[str, list[torch.Tensor]] = {"base": [], "tilted": [], "base_mean": [], "tilted_mean": []}
    for start in range(0, n, block):
        indices = range(start, min(n, start + block))
        for model, model_steps in (("base", 0), ("tilted", steps)):
            chains = sampler.sample_indices(indices, seed, steps=model_steps)
            out[model].append(chains.sample)
            out[f"{model}_mean"].append(chains.mean)
    return {key: torch.cat(parts) for key, parts in out.items()}


def hq_measure(name: str, truth):
    """points [N, 2] → the share of "high-quality" samples (see the module docstring)."""
    if name == "gaussians":
        from trainer.evaluation.toy_likelihood import near_mode_fraction

        return lambda points: near_mode_fraction(truth, points)
    curve = tm.roll_curve()
    return lambda points: float((tm.distance_to_curve(points, curve) < 3 * truth.noise).double().mean())


# ----------------------------------------------------------------------------------------------
# Digits.


def digits_experiment(settings: Settings, seed: int, models_dir: Path, report) -> dict:
    """NVAE vs tilted NVAE on 16×16 digits: digit-feature Fréchet distance to the held-out digits."""
    from data.bundled import load_digits_split
    from trainer.evaluation.digit_classifier import load_or_train_classifier
    from trainer.evaluation.train_models import sampler_for
    from trainer.metrics.frechet import frechet_distance

    nvae_run, tilt_run, results = train_digit_models(settings, seed, models_dir, report)
    trained = time.perf_counter()
    judge = load_or_train_classifier(DIGIT_SIZE, seed, models_dir, log=report.log)
    n, sample_seed = settings.digits_samples, derive_seed(seed, "latent-tilting-digits")
    sampler = sampler_for(tilt_run, temperatures=(), log=report.log)  # the trained BN statistics, as Langevin uses
    steps = sampler.defaults["steps"] if settings.digits_sample_steps is None else settings.digits_sample_steps
    report.log(f"digits: {n} NVAE samples, and the same chains after {steps} Langevin steps in ε_z")
    nvae_sampler = sampler_for(nvae_run, temperatures=(1.0,), log=report.log)  # BN readjusted, as NVAE samples
    images = {"base": sampler.sample(n, steps=0, seed=sample_seed),
              "tilted": sampler.sample(n, steps=steps, seed=sample_seed),
              "base_bn_readjusted": nvae_sampler.sample(n, steps=0, seed=sample_seed)}

    as_nchw = lambda array: torch.from_numpy(array).permute(0, 3, 1, 2)
    reference = judge.features(as_nchw(load_digits_split("test", DIGIT_SIZE)[0]))
    training = judge.features(as_nchw(load_digits_split("train", DIGIT_SIZE)[0]))
    for key, batch in images.items():
        results[f"digits_{key}_fd"] = frechet_distance(reference, judge.features(batch))
        report.image(f"digits/samples_{key}", batch[:64], value_range=(0, 255))
    results.update(digits_train_fd=frechet_distance(reference, training), digits_classifier_acc=judge.accuracy,
                   digits_image_size=DIGIT_SIZE, digits_sample_steps=int(steps),
                   digits_eval_seconds=round(time.perf_counter() - trained, 1))
    return results


def train_digit_models(settings: Settings, seed: int, models_dir: Path, report) -> tuple[Path, Path, dict]:
    """(NVAE run, tilt run, timings): nvae/digits16, then vaebm/latent-tilting-digits at 16×16 on digits-train."""
    from trainer.evaluation.train_models import train_nvae_run, train_vaebm_run

    started = time.perf_counter()
    nvae_run = train_nvae_run("digits16", [f"train.seed={seed}", f"train.max_steps={settings.digits_nvae_steps}"],
                              models_dir, report.log)
    middle = time.perf_counter()
    # The preset is 32×32 on all digits; here it scores the 16×16 NVAE's decoder means, on the training split.
    overrides = [f"train.seed={seed}", f"train.max_steps={settings.digits_ebm_steps}", "data.dataset=digits-train",
                 f"data.image_size={DIGIT_SIZE}", "energy.layout=digits16", "train.image_every=0"]
    if settings.digits_ebm_batch:
        overrides += [f"train.global_batch_size={settings.digits_ebm_batch}",
                      f"train.per_device_batch_size={settings.digits_ebm_batch}"]
    if settings.digits_ebm_langevin_steps:
        overrides.append(f"langevin.steps={settings.digits_ebm_langevin_steps}")
    tilt_run = train_vaebm_run("latent-tilting-digits", nvae_run, overrides, models_dir, report.log)
    timings = {"digits_nvae_train_seconds": round(middle - started, 1),
               "digits_ebm_train_seconds": round(time.perf_counter() - middle, 1)}
    return nvae_run, tilt_run, timings
