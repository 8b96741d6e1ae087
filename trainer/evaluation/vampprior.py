"""vampprior: standard prior vs VampPrior in a VAE and a two-level HVAE on binarized digits (Tomczak & Welling 2018).

    python scripts/evaluate.py vampprior --quick --out vampprior.json --run-dir runs/eval/vampprior

1. Train four models with the NVAE trainer (preset nvae/vamp-digits: gated MLPs of 2 × 300 units, 40 latent
   units per level, Bernoulli decoder on dynamically binarized 8×8 grey digits of the `digits-train` split,
   KL warm-up): VAE (levels=1) and HVAE (levels=2), each with prior=standard and prior=vamp.
2. On the held-out `digits-test` split, binarized once with a fixed seed (the paper's fixed test
   binarization), with the EMA weights:
   - `<model>_ll`: test log-likelihood in nats per image by importance sampling with --is-samples
     posterior samples (5,000 in the paper), averaged over --test-points images (`<model>_ll_tenth`:
     the same with a tenth of the samples, which shows whether the estimate has converged;
     `<model>_elbo`: the training objective's ELBO averaged over --elbo-draws passes);
   - active units per latent level (Burda et al. 2015): units u with Cov_x(E_q[u|x]) > 0.01 over the
     test images (`<model>_active_units` for the one-level VAE, `..._z1` and `..._z2` for the HVAE), and
     the KL of each level in nats (`<model>_kl`, `..._kl_z1`, `..._kl_z2`; a VampPrior level's is the
     Monte Carlo estimate log q(z|x) − log p(z)). The 0.01 threshold is on the scale of N(0, I); a learned
     prior (VampPrior, p(z1|z2)) sets its own scale, so compare the KLs too;
   - `vae_vamp_gain`, `hvae_vamp_gain`: VampPrior LL minus standard LL (> 0: the VampPrior is better).
3. Images (with --run-dir): the learned pseudo-inputs of both VampPrior models, and samples of all four.

The paper's claim, on MNIST-sized data: the VampPrior beats the standard prior in each architecture and
activates more units. These are 1,437 training images of 64 pixels; the JSON reports what this run
measures, whichever way it goes. With --run-dir, re-running reuses (resumes) the trained models there.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, fields, replace

import torch

from trainer.errors import UserError

PRESET = "vamp-digits"
MODELS = {  # result prefix → (model.levels, model.prior)
    "vae_standard": (1, "standard"),
    "vae_vamp": (1, "vamp"),
    "hvae_standard": (2, "standard"),
    "hvae_vamp": (2, "vamp"),
}
ACTIVE_THRESHOLD = 0.01  # Burda et al.: a unit is active when the covariance of its posterior mean exceeds this


@dataclass
class Settings:
    """Sizes of the experiment's trainings and evaluations (QUICK and FULL, overridable by flags)."""

    steps: int | None  # training steps per model (None: the preset's train.max_steps)
    test_points: int   # held-out test images scored (at most the 360 of digits-test)
    is_samples: int    # importance samples per test image for the log-likelihood
    elbo_draws: int    # one-sample ELBO draws per test image
    au_samples: int    # z2 samples per image for E_q[z1|x] (HVAE active units)


FULL = Settings(steps=None, test_points=360, is_samples=5_000, elbo_draws=100, au_samples=100)
QUICK = Settings(steps=1_500, test_points=360, is_samples=500, elbo_draws=20, au_samples=32)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the experiment's options: each setting and training overrides."""
    for item in fields(Settings):
        flag = "--" + item.name.replace("_", "-")
        parser.add_argument(flag, type=int, default=None,
                            help=f"{item.name} (default: {getattr(FULL, item.name)} full, {getattr(QUICK, item.name)} quick)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help=f"dotted override for all four trainings (preset nvae/{PRESET}); repeatable")


def resolve_settings(args: argparse.Namespace) -> Settings:
    """The settings for --quick or full with the flags applied; UserError on a value below 1."""
    settings = replace(QUICK if args.quick else FULL,
                       **{f.name: getattr(args, f.name) for f in fields(Settings) if getattr(args, f.name) is not None})
    for item in fields(Settings):
        value = getattr(settings, item.name)
        if value is not None and value < 1:
            raise UserError(f"--{item.name.replace('_', '-')} must be >= 1, got {value}")
    return settings


def binarized_test_images(image_size: int, count: int, seed: int) -> torch.Tensor:
    """The first `count` digits-test images, binarized once: [count, 3, S, S] in {−1, +1}, grey replicated
    (one Bernoulli draw per pixel, so the models see a fixed binary image and never re-binarize it)."""
    from data.bundled import load_digits_split

    images, _ = load_digits_split("test", image_size)
    grey = torch.from_numpy(images[:count, :, :, :1]).permute(0, 3, 1, 2).float() / 255.0  # [N, 1, S, S] in [0, 1]
    binary = torch.bernoulli(grey, generator=torch.Generator().manual_seed(seed)) * 2.0 - 1.0
    return binary.expand(-1, 3, -1, -1)


@torch.no_grad()
def score(model, x: torch.Tensor, settings: Settings, seed: int) -> dict[str, float]:
    """Test LL (importance sampling), ELBO and active units per level of one trained model."""
    generator = torch.Generator().manual_seed(seed)
    ll = model.log_likelihood(x, settings.is_samples, batch=16_384, generator=generator)
    ll_tenth = model.log_likelihood(x, max(1, settings.is_samples // 10), batch=16_384, generator=generator)
    with torch.random.fork_rng(devices=[]):  # the training pass draws from the global RNG: seed it, then restore it
        torch.manual_seed(seed)
        outputs = [model(x) for _ in range(settings.elbo_draws)]
    elbo = torch.stack([o.recon_log_prob - torch.stack(o.kl_per_group).sum(0) for o in outputs]).mean()
    kl = torch.stack([torch.stack(o.kl_per_group).mean(1) for o in outputs]).mean(0)  # [levels], top first
    means = model.posterior_means(x, settings.au_samples, generator=generator)  # top level first
    active = [int((m.var(dim=0) > ACTIVE_THRESHOLD).sum()) for m in means]
    result = {"ll": float(ll.mean()), "ll_tenth": float(ll_tenth.mean()), "elbo": float(elbo)}
    suffixes = [""] if len(active) == 1 else ["_z2", "_z1"]
    for suffix, units, nats in zip(suffixes, active, kl.tolist()):
        result[f"active_units{suffix}"], result[f"kl{suffix}"] = units, nats
    return result


def run(args: argparse.Namespace, report) -> dict:
    """Train VAE and HVAE with standard and VampPrior priors; returns test log-likelihoods and ELBOs."""
    from trainer.ebm.sources import load_frozen_vae
    from trainer.evaluation.train_models import nvae_config, train_nvae_run

    settings = resolve_settings(args)
    models_dir = report.work_dir("models")
    common = [f"train.seed={args.seed}", *args.override]
    if settings.steps is not None:
        common.append(f"train.max_steps={settings.steps}")
    cfg = nvae_config(PRESET, common)
    x = binarized_test_images(cfg.model.image_size, settings.test_points, args.seed)
    report.log(f"{len(x)} binarized digits-test images of {cfg.model.image_size}x{cfg.model.image_size}; "
               f"{settings.is_samples} importance samples each")

    results: dict = {}
    for name, (levels, prior) in MODELS.items():
        started = time.perf_counter()
        run_dir = train_nvae_run(PRESET, [*common, f"model.levels={levels}", f"model.prior={prior}"], models_dir,
                                 log=report.log)
        trained = time.perf_counter()
        model, _ = load_frozen_vae(run_dir, weights="ema")
        scores = score(model, x, settings, args.seed)
        results.update({f"{name}_{key}": value for key, value in scores.items()})
        results[f"{name}_train_seconds"] = round(trained - started, 1)
        results[f"{name}_eval_seconds"] = round(time.perf_counter() - trained, 1)
        report.log(f"{name}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in scores.items()))
        samples = model.sample(64, generator=torch.Generator().manual_seed(args.seed)).x_mean
        report.image(f"samples/{name}", samples, ncol=8)
        if prior == "vamp":
            report.image(f"pseudo_inputs/{name}", model.pseudo_input_images(), ncol=10)

    for architecture in ("vae", "hvae"):
        results[f"{architecture}_vamp_gain"] = results[f"{architecture}_vamp_ll"] - results[f"{architecture}_standard_ll"]
    results.update(
        test_points=len(x), is_samples=settings.is_samples, elbo_draws=settings.elbo_draws,
        au_samples=settings.au_samples, train_steps=cfg.train.max_steps, pseudo_inputs=cfg.model.pseudo_inputs,
        latent_dim=cfg.model.latent_dim, image_size=cfg.model.image_size, weights="ema",
        test_binarization_seed=args.seed,
    )
    return results
