"""Out-of-distribution detection by log-density, NVAE vs VAEBM (VAEBM §5.3, Table 6 on digits).

    python scripts/evaluate.py ood [--quick] --out ood.json [--run-dir runs/eval/ood]

An NVAE (preset nvae/digits16) and a VAEBM on it (vaebm/digits16) are trained from scratch on
`digits-train`. Each scores the 359 held-out `digits-test` digits (in distribution) and as many images of
every OOD set; AUROC (sklearn) is the probability that a random held-out digit scores higher than a
random OOD image: 1 separates perfectly, 0.5 is chance, below 0.5 means the OOD set looks MORE likely.
Keys `<method>_<set>_auroc`. The scores:

- nvae:   log p̂_θ(x), the importance-weighted bound (IWAE, Burda et al.) with `--iwae-samples` posterior
          samples (1 would be the ELBO), at temperature 1 with the trained BN statistics;
- vaebm:  log h(x) = log p̂_θ(x) − E_ψ(x), the paper's unnormalized log-density with the SAME bound and
          the same posterior draws, so the two differ by the energy alone (log Z is a constant and does
          not change an AUROC);
- energy: −E_ψ(x) alone, to show what the energy contributes by itself.

OOD sets, all grey (replicated to RGB, like the bundled digits) at the models' image size:
photos (crops of scikit-image's bundled photographs, converted to luminance), noise (uniform pixels),
interp (pixel-wise midpoints of two different held-out digits, as Table 6's interpolations), constant
(one random grey level per image) and inverted (255 − a held-out digit).
"""
from __future__ import annotations

import numpy as np
import torch

from trainer.evaluation import digit_experiments as common

QUICK = {"image_size": 16, "nvae_steps": 500, "vaebm_steps": 150, "samples": 359}
FULL = {"image_size": 16, "nvae_steps": 3000, "vaebm_steps": 600, "samples": 359}
IWAE_SAMPLES = {"quick": 8, "full": 64}
OOD_SETS = ("photos", "noise", "interp", "constant", "inverted")


def add_arguments(parser) -> None:
    """Add the experiment's options (the shared ones, plus the IWAE sample count)."""
    common.add_arguments(parser, samples_help="images in each OOD set (default: as many as held-out digits, 359)")
    parser.add_argument("--iwae-samples", type=int, default=None,
                        help=f"posterior samples of the IWAE bound (default: {IWAE_SAMPLES['quick']} quick, "
                             f"{IWAE_SAMPLES['full']} full)")


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """AUROC of telling in-distribution (label 1) from OOD (label 0) by score, higher = more in-distribution.

    A non-finite score (a model that overflowed on a strange input) counts as the lowest (−inf, NaN) or
    highest (+inf) score of all, instead of crashing sklearn.
    """
    from sklearn.metrics import roc_auc_score

    scores = np.concatenate([np.asarray(in_scores, dtype=np.float64), np.asarray(out_scores, dtype=np.float64)])
    finite = scores[np.isfinite(scores)]
    low, high = (finite.min() - 1.0, finite.max() + 1.0) if finite.size else (-1.0, 1.0)
    scores = np.where(np.isposinf(scores), high, np.where(np.isfinite(scores), scores, low))
    labels = np.concatenate([np.ones(len(in_scores)), np.zeros(len(out_scores))])
    return float(roc_auc_score(labels, scores))


def gray_rgb(gray: np.ndarray) -> torch.Tensor:
    """uint8 grey images [N, S, S] → uint8 [N, 3, S, S] (the bundled digits' format)."""
    return torch.from_numpy(np.ascontiguousarray(np.repeat(gray[:, None], 3, axis=1)))


def ood_sets(held_out: np.ndarray, size: int, count: int, seed: int) -> dict[str, torch.Tensor]:
    """The OOD sets, uint8 [count, 3, S, S] each, from held-out grey digits [N, S, S]; a function of the arguments."""
    from data.bundled import load_photo_crops

    rng = np.random.default_rng([seed, size, count, 5])
    photos = load_photo_crops(size, count, seed).astype(np.float64)
    first = rng.integers(len(held_out), size=count)
    second = (first + rng.integers(1, len(held_out), size=count)) % len(held_out)  # never the same digit
    inverted = 255 - held_out[rng.integers(len(held_out), size=count)]
    return {
        "photos": gray_rgb(np.rint(photos @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)),
        "noise": gray_rgb(rng.integers(0, 256, size=(count, size, size), dtype=np.uint8)),
        "interp": gray_rgb(np.rint((held_out[first].astype(np.float64) + held_out[second]) / 2).astype(np.uint8)),
        "constant": gray_rgb(np.repeat(rng.integers(0, 256, size=(count, 1, 1)), size, 1).repeat(size, 2).astype(np.uint8)),
        "inverted": gray_rgb(inverted),
    }


def run(args, report) -> dict:
    """Train NVAE and VAEBM on digits; AUROCs of held-out digits vs each OOD set by their log-density scores."""
    from data.bundled import load_digits_split
    from trainer.errors import UserError
    from trainer.evaluation.train_models import sampler_for

    settings = common.resolve(args, report, QUICK, FULL)
    iwae = args.iwae_samples or IWAE_SAMPLES["quick" if args.quick else "full"]
    if iwae < 1:
        raise UserError(f"--iwae-samples must be >= 1, got {iwae}")
    nvae_run, vaebm_run = common.train_models(settings, "digits16", report)
    # Scoring uses the trained BN statistics only: no readjustment needed in these bundles.
    vae = sampler_for(nvae_run, temperatures=(), log=report.log)
    vaebm = sampler_for(vaebm_run, temperatures=(), log=report.log)

    held_out = load_digits_split("test", settings.image_size)[0][..., 0]  # [359, S, S]
    sets = {"digits": gray_rgb(held_out), **ood_sets(held_out, settings.image_size, settings.samples, args.seed)}
    scores = {}
    for name, images in sets.items():
        report.log(f"scoring {len(images)} '{name}' images (IWAE with {iwae} samples, energy)")
        report.image(f"sets/{name}", images[:32], value_range=(0, 255))
        log_p = vae.log_density_unnormalized(images, num_samples=iwae, seed=args.seed).numpy()
        energy = vaebm.energy(images).numpy()
        scores[name] = {"nvae": log_p, "vaebm": log_p - energy, "energy": -energy}

    results = {"image_size": settings.image_size, "nvae_steps": settings.nvae_steps,
               "vaebm_steps": settings.vaebm_steps, "iwae_samples": iwae, "in_count": len(held_out),
               "ood_count": settings.samples}
    for method in ("nvae", "vaebm", "energy"):
        for name in OOD_SETS:
            results[f"{method}_{name}_auroc"] = auroc(scores["digits"][method], scores[name][method])
    for name in sets:  # mean scores per set (nats), to read the AUROCs by
        results[f"mean_log_p_{name}"] = float(np.mean(scores[name]["nvae"]))
        results[f"mean_energy_{name}"] = float(-np.mean(scores[name]["energy"]))
    return results
