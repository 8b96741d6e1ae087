"""Fréchet distance in a digit classifier's feature space, NVAE vs VAEBM samples (the CPU analogue of FID gains).

    python scripts/evaluate.py fd-digits [--quick] --out fd.json [--run-dir runs/eval/fd-digits]

An NVAE (preset nvae/digits16) and a VAEBM on it (vaebm/digits16) are trained from scratch on
`digits-train`. Both draw `--samples` images from the same noise (the VAEBM ones are the NVAE ones moved by
Langevin); the Fréchet distance between the Gaussians fitted to the penultimate-layer features of the digit
classifier (64-d; `digit_classifier.py`) is taken against the 359 held-out `digits-test` digits, which no
model has seen. Lower is better. `train_fd` is the distance of the 1,438 training digits themselves to the
held-out ones: what a model that reproduced its training set would score. With only 359 reference
images the estimates carry a bias that is the same for every set compared, so compare the numbers
with each other, not with FIDs.
"""
from __future__ import annotations

from trainer.evaluation import digit_experiments as common

QUICK = {"image_size": 16, "nvae_steps": 500, "vaebm_steps": 150, "samples": 1000}
FULL = {"image_size": 16, "nvae_steps": 3000, "vaebm_steps": 600, "samples": 10000}


def add_arguments(parser) -> None:
    """Add the experiment's options (the shared ones of the digit experiments)."""
    common.add_arguments(parser, samples_help="samples of each model (NVAE and VAEBM)")


def run(args, report) -> dict:
    """Train NVAE and VAEBM on digits; Fréchet distances of their samples (and train set) to held-out digits."""
    import torch

    from data.bundled import load_digits_split
    from trainer.evaluation.train_models import sampler_for
    from trainer.metrics.frechet import frechet_distance

    settings = common.resolve(args, report, QUICK, FULL)
    judge = common.classifier(settings, args.seed, report)
    _, vaebm_run = common.train_models(settings, "digits16", report)
    sampler = sampler_for(vaebm_run, bn_passes=settings.bn_passes, log=report.log)
    vae_images, vaebm_images = common.draw_samples(sampler, settings, args.seed, report)

    as_nchw = lambda images: torch.from_numpy(images).permute(0, 3, 1, 2)
    held_out = as_nchw(load_digits_split("test", settings.image_size)[0])
    training = as_nchw(load_digits_split("train", settings.image_size)[0])
    report.image("held_out", held_out[:64], value_range=(0, 255))
    reference = judge.features(held_out)
    results = {
        "nvae_fd": frechet_distance(reference, judge.features(vae_images)),
        "vaebm_fd": frechet_distance(reference, judge.features(vaebm_images)),
        "train_fd": frechet_distance(reference, judge.features(training)),
        "classifier_acc": judge.accuracy, "reference_count": len(held_out), "train_count": len(training),
        "nvae_samples": len(vae_images), "vaebm_samples": len(vaebm_images), "image_size": settings.image_size,
        "nvae_steps": settings.nvae_steps, "vaebm_steps": settings.vaebm_steps,
        "sample_steps": int(sampler.defaults["steps"] if settings.sample_steps is None else settings.sample_steps),
    }
    return results
