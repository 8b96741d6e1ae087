"""The digit evaluation experiments (modes, fd-digits, ood): their metrics on cases with known answers,
the stacked-digits dataset and the held-out split, and one tiny end-to-end run through scripts/evaluate.py."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from data.bundled import (
    digits_split,
    load_digits_images,
    load_digits_split,
    load_stacked_digits,
    write_bundled_shards,
)
from data.shards import read_index
from trainer.evaluation.digit_classifier import FEATURES, train_classifier
from trainer.evaluation.modes import classify_channels, mode_statistics, stacked_labels
from trainer.evaluation.ood import OOD_SETS, auroc, ood_sets
from trainer.metrics.frechet import (
    frechet_distance,
    frechet_distance_gaussians,
    sqrtm_psd,
)

ROOT = Path(__file__).resolve().parents[1]


def random_covariance(rng, dim):
    a = rng.normal(size=(dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


# --- Fréchet distance ---------------------------------------------------------------------------


def test_frechet_matches_closed_forms():
    rng = np.random.default_rng(0)
    # Diagonal covariances: FD = |Δμ|² + Σ_i (√a_i − √b_i)².
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 3, size=5), rng.uniform(0.1, 3, size=5)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance_gaussians(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # General covariances: the textbook formula with scipy's (non-symmetric) sqrtm of Σ₁Σ₂.
    s1, s2 = random_covariance(rng, 8), random_covariance(rng, 8)
    textbook = np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance_gaussians(np.zeros(8), s1, np.zeros(8), s2) == pytest.approx(textbook, rel=1e-8)
    # Symmetric in its arguments, and sqrtm_psd squares back.
    assert frechet_distance_gaussians(np.zeros(8), s2, np.zeros(8), s1) == pytest.approx(textbook, rel=1e-8)
    root = sqrtm_psd(s1)
    np.testing.assert_allclose(root @ root, s1, atol=1e-10)


def test_frechet_of_feature_sets():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(500, 6))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-9)
    # Shifting one set moves only the mean term; a singular covariance (dead features) is fine.
    shift = np.array([1.0, -2.0, 0, 0, 0, 0.5])
    assert frechet_distance(features, features + shift) == pytest.approx((shift ** 2).sum(), rel=1e-9)
    dead = features.copy()
    dead[:, :3] = 0.0
    assert math.isfinite(frechet_distance(features, dead)) and frechet_distance(features, dead) > 1.0
    # Large samples of two Gaussians approach the closed form.
    cov = random_covariance(rng, 6)
    x = rng.normal(size=(200_000, 6))
    y = rng.multivariate_normal(np.ones(6), cov, size=200_000)
    exact = frechet_distance_gaussians(np.zeros(6), np.eye(6), np.ones(6), cov)
    assert frechet_distance(x, y) == pytest.approx(exact, rel=0.02)


# --- the split and the stacked-digits dataset -------------------------------------------------


def test_digits_split_is_a_fixed_stratified_partition():
    _, labels = load_digits_images(8)
    train, test = digits_split(labels)
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == len(labels)
    assert np.array_equal(digits_split(labels)[1], test)  # fixed
    per_class = np.bincount(labels[test], minlength=10)
    assert per_class.min() >= 35 and per_class.max() <= 37  # 20% of each class (174..183 images)
    images, test_labels = load_digits_split("test", 8)
    assert images.shape == (len(test), 8, 8, 3) and np.array_equal(test_labels, labels[test])


def test_stacked_digits_modes_come_from_the_training_split():
    train_images, train_labels = load_digits_split("train", 8)
    lookup = {image[..., 0].tobytes(): label for image, label in zip(train_images, train_labels)}
    test_images, _ = load_digits_split("test", 8)
    held_out = {image[..., 0].tobytes() for image in test_images} - set(lookup)
    images, labels = load_stacked_digits(8, count=3000, seed=1)
    assert images.shape == (3000, 8, 8, 3) and images.dtype == np.uint8
    channel_digits = np.array([[lookup[images[i, :, :, c].tobytes()] for c in range(3)] for i in range(3000)])
    assert np.array_equal(stacked_labels(channel_digits), labels)  # label = 100·r + 10·g + b of the channels
    assert not any(images[i, :, :, c].tobytes() in held_out for i in range(3000) for c in range(3))
    # Independent uniform channels: 1,000 equally likely modes, so 3,000 draws hit about 1000·(1 − e⁻³) ≈ 950.
    assert 920 <= len(np.unique(labels)) <= 980
    assert (channel_digits[:, 0] != channel_digits[:, 1]).mean() == pytest.approx(0.9, abs=0.03)
    again, _ = load_stacked_digits(8, count=3000, seed=1)
    other, _ = load_stacked_digits(8, count=3000, seed=2)
    assert np.array_equal(again, images) and not np.array_equal(other, images)


def test_stacked_digits_shards(tmp_path):
    info = write_bundled_shards("stacked-digits", 8, tmp_path / "shards", count=250)
    assert info["samples"] == 250 and read_index(tmp_path / "shards")["num_samples"] == 250


# --- mode statistics and AUROC ------------------------------------------------------------------


def test_mode_statistics_known_answers():
    assert mode_statistics(np.repeat(np.arange(1000), 3)) == (1000, pytest.approx(0.0, abs=1e-12))
    assert mode_statistics(np.full(500, 417)) == (1, pytest.approx(math.log(1000)))
    assert mode_statistics(np.array([3, 3, 998, 998])) == (2, pytest.approx(math.log(500)))
    # 250 modes, each 4 times: KL = log(1000 / 250).
    assert mode_statistics(np.repeat(np.arange(0, 1000, 4), 4)) == (250, pytest.approx(math.log(4)))
    assert np.array_equal(stacked_labels(np.array([[1, 2, 3], [9, 0, 9]])), [123, 909])
    with pytest.raises(ValueError):
        mode_statistics(np.array([1000]))


def test_auroc_direction():
    high, low = np.array([5.0, 6.0, 7.0]), np.array([-1.0, 0.0, 1.0])
    assert auroc(high, low) == 1.0  # in-distribution scores higher: perfectly separated
    assert auroc(low, high) == 0.0  # OOD looks more likely than the data
    assert auroc(np.zeros(4), np.zeros(5)) == 0.5
    assert auroc(high, np.array([-np.inf, np.nan, 0.0])) == 1.0  # failed scores rank lowest
    assert auroc(high, np.array([np.inf, 0.0])) == 0.5


def test_classifier_reads_each_channel_of_stacked_digits():
    """A quickly trained 8×8 judge labels stacked training digits channel by channel, in r, g, b order."""
    judge = train_classifier(8, seed=0, epochs=10)
    assert judge.accuracy > 0.9  # the real one (16×16, 20 epochs) reaches >= 97%: checked end to end below
    images, labels = load_stacked_digits(8, count=300, seed=3)
    predicted = stacked_labels(classify_channels(judge, torch.from_numpy(images).permute(0, 3, 1, 2)))
    assert (predicted == labels).mean() > 0.85
    features = judge.features(torch.from_numpy(images[:10, :, :, 0]))
    assert features.shape == (10, FEATURES) and np.isfinite(features).all()


def test_ood_sets():
    held_out = load_digits_split("test", 16)[0][..., 0]
    sets = ood_sets(held_out, 16, 40, seed=0)
    assert set(sets) == set(OOD_SETS)
    for images in sets.values():
        assert images.shape == (40, 3, 16, 16) and images.dtype == torch.uint8
        assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])  # grey, as digits
    assert all(len(torch.unique(image)) == 1 for image in sets["constant"])
    assert not any(torch.equal(image, torch.from_numpy(digit)) for image in sets["interp"][:, 0] for digit in held_out)
    again = ood_sets(held_out, 16, 40, seed=0)
    assert all(torch.equal(sets[name], again[name]) for name in sets)


# --- end to end -------------------------------------------------------------------------------


@pytest.mark.slow
def test_fd_digits_end_to_end(tmp_path):
    """A tiny fd-digits run through the command line: trains the classifier, an NVAE and a VAEBM."""
    out = tmp_path / "fd.json"
    tiny = ["train.global_batch_size=8", "train.per_device_batch_size=8", "train.checkpoint_every=1000"]
    command = [sys.executable, str(ROOT / "scripts" / "evaluate.py"), "fd-digits", "--quick", "--out", str(out),
               "--run-dir", str(tmp_path / "run"), "--data-cache", str(tmp_path / "data"), "--nvae-steps", "4",
               "--vaebm-steps", "2", "--samples", "24", "--sample-steps", "2", "--bn-passes", "2",
               *[f"--nvae-set={o}" for o in tiny], *[f"--vaebm-set={o}" for o in tiny], "--vaebm-set=data_init_batches=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["experiment"] == "fd-digits"
    assert result["classifier_acc"] >= 0.97  # the judge must be good enough to trust
    assert result["nvae_samples"] == result["vaebm_samples"] == 24 and result["reference_count"] == 359
    for key in ("nvae_fd", "vaebm_fd", "train_fd"):
        assert math.isfinite(result[key]) and result[key] >= 0
    assert result["train_fd"] < result["nvae_fd"]  # real digits are closer to real digits than a 4-step VAE's
    assert (tmp_path / "run" / "samples_vaebm.png").is_file() and "nvae_fd" in done.stdout
    # The models sit in the models folder, keyed by their config: a second run reuses them.
    runs = sorted(p.name.split("-")[0] for p in (tmp_path / "run" / "models").iterdir() if p.name[0] != ".")
    assert runs == ["digit", "nvae", "vaebm"]


@pytest.mark.slow
def test_modes_curve_end_to_end(tmp_path):
    """A tiny stacked-digits modes run with `--curve 1,2`: one energy run, measured at iteration 1 from its
    checkpoint and at iteration 2 (the headline); the curve's last point is the headline's numbers."""
    out = tmp_path / "modes.json"
    tiny = ["train.global_batch_size=8", "train.per_device_batch_size=8"]
    command = [sys.executable, str(ROOT / "scripts" / "evaluate.py"), "modes", "--quick", "--out", str(out),
               "--run-dir", str(tmp_path / "run"), "--data-cache", str(tmp_path / "data"), "--nvae-steps", "2",
               "--curve", "2,1", "--samples", "24", "--sample-steps", "2", "--bn-passes", "2",
               *[f"--nvae-set={o}" for o in tiny], *[f"--vaebm-set={o}" for o in tiny], "--vaebm-set=data_init_batches=1"]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["vaebm_steps"] == 2 and [p["energy_iterations"] for p in result["curve"]] == [1, 2]
    assert result["curve"][-1] == {"energy_iterations": 2, "vaebm_modes": result["vaebm_modes"],
                                   "vaebm_kl": result["vaebm_kl"]}
    assert all(1 <= p["vaebm_modes"] <= 24 and p["vaebm_kl"] >= 0 for p in result["curve"])
