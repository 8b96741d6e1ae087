"""Mode coverage on stacked digits (VAEBM §5.3, Table 5: StackedMNIST; paper: VAEBM 1,000 modes, KL 0.087).

    python scripts/evaluate.py modes [--quick] --out modes.json [--run-dir runs/eval/modes]

The `stacked-digits` dataset (data/bundled.py) puts an independent random `digits-train` digit in each RGB
channel, so it has 1,000 modes (r, g, b). An NVAE (preset nvae/stacked-digits) and a VAEBM on it
(vaebm/stacked-digits) are trained from scratch; then each draws `--samples` images, and the digit
classifier (trained on digits-train, tested on digits-test) labels every channel on its own. Reported:
the number of modes hit at least once and KL(sample mode distribution ‖ uniform over 1,000), the
direction of the paper (Lin et al., 2018). For reference the same is measured on as many images of the
dataset itself (`data_modes`, `data_kl`): the best a generator can score with this classifier and this
many samples (finite samples alone give a KL of about 999 / (2 · samples)).
"""
from __future__ import annotations

import math

import numpy as np

from trainer.errors import UserError
from trainer.evaluation import digit_experiments as common

NUM_MODES = 1000
QUICK = {"image_size": 16, "nvae_steps": 500, "vaebm_steps": 150, "samples": 1500}
FULL = {"image_size": 16, "nvae_steps": 4000, "vaebm_steps": 600, "samples": 10000}


def add_arguments(parser) -> None:
    """Add the experiment's options (the shared ones, plus the optional training curve)."""
    common.add_arguments(parser, samples_help="samples of each model to classify (paper: >= 10,000)")
    parser.add_argument("--curve", default=None, metavar="N,N,...",
                        help="also measure VAEBM after these energy iterations (one run, checkpoints kept at each; "
                             "the last is the headline), e.g. 150,300,600,1200")


def stacked_labels(channel_digits: np.ndarray) -> np.ndarray:
    """Per-channel digits [N, 3] in 0..9 → mode labels [N] in 0..999 (100·r + 10·g + b)."""
    channel_digits = np.asarray(channel_digits)
    if channel_digits.ndim != 2 or channel_digits.shape[1] != 3:
        raise ValueError(f"expected per-channel digits [N, 3], got shape {channel_digits.shape}")
    return channel_digits @ np.array([100, 10, 1])


def mode_statistics(labels: np.ndarray, num_modes: int = NUM_MODES) -> tuple[int, float]:
    """(modes covered, KL(p ‖ uniform) in nats) of mode labels [N] in 0..num_modes−1.

    p is the empirical distribution of the labels; KL(p ‖ u) = Σ_k p_k log(p_k · num_modes), which is
    0 for a perfectly even sample and log(num_modes) when every sample falls in one mode.
    """
    labels = np.asarray(labels)
    if labels.size == 0 or labels.min() < 0 or labels.max() >= num_modes:
        raise ValueError(f"labels must be a non-empty array of values in 0..{num_modes - 1}")
    counts = np.bincount(labels, minlength=num_modes)
    p = counts[counts > 0] / labels.size
    return int((counts > 0).sum()), float(max((p * np.log(p * num_modes)).sum(), 0.0))


def classify_channels(judge, images) -> np.ndarray:
    """uint8 images [N, 3, S, S] → the classifier's digit for each channel, [N, 3]."""
    n, channels, height, width = images.shape
    return judge.predict(images.reshape(n * channels, height, width)).reshape(n, channels)


def run(args, report) -> dict:
    """Train NVAE and VAEBM on stacked digits; modes hit and KL to uniform for data and each (and a curve)."""
    import torch

    from data.bundled import load_stacked_digits
    from trainer.evaluation.train_models import sampler_for

    curve = parse_curve(args.curve)
    if curve:  # one energy run to the last point, a checkpoint kept at every point
        args.vaebm_steps = curve[-1]
        every = math.gcd(*curve)
        args.vaebm_set = [*args.vaebm_set, f"train.checkpoint_every={every}",
                          f"train.keep_checkpoints={max(2, curve[-1] // every + 1)}"]
    settings = common.resolve(args, report, QUICK, FULL)
    judge = common.classifier(settings, args.seed, report)

    images, true_labels = load_stacked_digits(settings.image_size)  # the dataset the models train on
    data = torch.from_numpy(images[:settings.samples]).permute(0, 3, 1, 2)
    data_labels = stacked_labels(classify_channels(judge, data))
    channel_accuracy = float((data_labels == true_labels[:settings.samples]).mean())
    data_modes, data_kl = mode_statistics(data_labels)
    report.log(f"dataset: {data_modes} modes, KL {data_kl:.3f} "
               f"(all three channels right on {100 * channel_accuracy:.1f}% of images)")

    _, vaebm_run = common.train_models(settings, "stacked-digits", report)
    sampler = sampler_for(vaebm_run, bn_passes=settings.bn_passes, log=report.log)
    vae_images, vaebm_images = common.draw_samples(sampler, settings, args.seed, report)
    report.image("data", data[:64], value_range=(0, 255))
    results = {"classifier_acc": judge.accuracy, "classifier_test_count": judge.test_count,
               "image_size": settings.image_size, "nvae_steps": settings.nvae_steps,
               "vaebm_steps": settings.vaebm_steps, "sample_steps": int(sampler.defaults["steps"]
                                                                       if settings.sample_steps is None
                                                                       else settings.sample_steps)}
    for name, samples in (("nvae", vae_images), ("vaebm", vaebm_images)):
        modes, kl = mode_statistics(stacked_labels(classify_channels(judge, samples)))
        results.update({f"{name}_modes": modes, f"{name}_kl": kl, f"{name}_samples": len(samples)})
    results.update({"data_modes": data_modes, "data_kl": data_kl, "data_samples": len(data_labels),
                    "data_label_acc": channel_accuracy, "kl_max": math.log(NUM_MODES)})
    if curve:  # the last point is the headline run measured above; the earlier ones from their checkpoints
        results["curve"] = []
        for steps in curve[:-1]:
            at = sampler_for(vaebm_run, bn_passes=settings.bn_passes, step=steps, log=report.log)
            report.log(f"VAEBM after {steps} energy iterations: sampling {settings.samples} images")
            images = at.sample(settings.samples, steps=settings.sample_steps, seed=args.seed)
            modes, kl = mode_statistics(stacked_labels(classify_channels(judge, images)))
            results["curve"].append({"energy_iterations": steps, "vaebm_modes": modes, "vaebm_kl": kl})
            report.log(f"  {steps} iterations: {modes} modes, KL {kl:.3f}")
        results["curve"].append({"energy_iterations": curve[-1], "vaebm_modes": results["vaebm_modes"],
                                 "vaebm_kl": results["vaebm_kl"]})
    return results


def parse_curve(text: str | None) -> list[int]:
    """'150,300,600' → [150, 300, 600] (sorted, each ≥ 1); None → []."""
    if not text:
        return []
    try:
        steps = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise UserError(f"--curve takes comma-separated energy iteration counts, got {text!r}") from None
    if not steps or steps[0] < 1:
        raise UserError(f"--curve iteration counts must be >= 1, got {text!r}")
    return steps
