"""FID and KID through torch-fidelity, fully offline: features, statistics, a cached reference, an evaluator.

The network is torch-fidelity's InceptionV3 ("inception-v3-compat": the TF FID graph inception-2015-12-05,
TF 1.x bilinear resize to 299, 2048-d pool features) with a weights file made offline by `evaluate.py
fid-weights` (`trainer/metrics/inception.py`). FID and KID are torch-fidelity's own functions on those
features. A reference's features and statistics are cached, keyed by the reference's content (a shard set:
its index.json, which lists every shard's SHA-256) and the weights file's SHA-256.

`FidEvaluator` (built once) scores a sampling function; the training loops use it at an interval
(`eval.fid_every`, `trainer/run/fid.py`) and `evaluate.py fid` (`trainer/evaluation/fid.py`) once.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from data.sources import ShardLocation
from models.files import atomic_write, file_digest
from trainer.errors import UserError
from trainer.metrics.image_sets import ImageSet, open_image_set
from trainer.metrics.inception import extract_features, load_extractor, resolve_weights

DEFAULT_CACHE = Path("~/.cache/vaebm-trainer/fid/reference")
NETWORK = ("torch-fidelity inception-v3-compat (TF FID Inception inception-2015-12-05, TF1 bilinear resize "
           "to 299, 2048-d pool features)")
CACHE_VERSION = 1
QUICK_SAMPLES, QUICK_REFERENCE = 250, 500  # --quick: at most this many samples / reference images


# ----------------------------------------------------------------------------------------------
# The metrics: torch-fidelity's functions on [N, 2048] features.


def statistics(features: torch.Tensor) -> dict[str, np.ndarray]:
    """{"mu": [2048], "sigma": [2048, 2048]} of features [N, 2048] (torch-fidelity's own function)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    return fid_features_to_statistics(features)


def scores(features: torch.Tensor, reference: torch.Tensor, reference_stats: dict | None = None, *,
           kid_subset_size: int = 1000, kid_subsets: int = 100, seed: int = 0) -> dict:
    """FID and KID of sample features [N, 2048] against reference features [M, 2048].

    KID's subset size is min(kid_subset_size, N, M) (torch-fidelity refuses a larger one).
    """
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    n, m = len(features), len(reference)
    if n < 2 or m < 2:
        raise UserError(f"FID and KID need at least 2 images on each side, got {n} samples and {m} reference images")
    subset = min(kid_subset_size, n, m)
    fid = fid_statistics_to_metric(statistics(features), reference_stats or statistics(reference), False)
    kid = kid_features_to_metric(features, reference, kid_subset_size=subset, kid_subsets=kid_subsets,
                                 rng_seed=seed, verbose=False)
    return {"fid": fid[KEY_METRIC_FID], "kid": kid[KEY_METRIC_KID_MEAN], "kid_std": kid[KEY_METRIC_KID_STD],
            "kid_subset_size": subset, "kid_subsets": kid_subsets, "num_samples": n, "num_reference": m}


# ----------------------------------------------------------------------------------------------
# Reference features, cached per (reference content, weights).


def reference_features(images: ImageSet, extractor, weights_sha256: str, cache_dir: Path | None, batch_size: int,
                       log: Callable[[str], None] = lambda message: None) -> tuple[torch.Tensor, dict, bool]:
    """(features [M, 2048], statistics, whether they came from the cache) of a reference image set.

    The cache file `cache_dir/ref-<key>.npz` (numpy, no pickle) holds the features (for KID), mu and
    sigma, and the key's ingredients; it is written atomically.
    """
    key = {"version": CACHE_VERSION, "reference": images.identity(), "weights_sha256": weights_sha256}
    name = json.dumps(key, sort_keys=True)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir).expanduser() / f"ref-{hashlib.sha256(name.encode()).hexdigest()[:24]}.npz"
        cached = _load_cache(path, name)
        if cached is not None:
            log(f"reference statistics from the cache {path}")
            return (*cached, True)
    log(f"reference features of {images.describe()} ...")
    features = extract_features(extractor, images.batches(batch_size))
    if images.skipped:
        log(f"skipped {images.skipped} unreadable reference samples")
    stats = statistics(features)
    if path is not None:
        _save_cache(path, name, features, stats)
        log(f"cached reference statistics in {path}")
    return features, stats, False


def _load_cache(path: Path, name: str) -> tuple[torch.Tensor, dict] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != name:
                return None
            return torch.from_numpy(data["features"]), {"mu": data["mu"], "sigma": data["sigma"]}
    except (OSError, KeyError, ValueError):
        return None  # unreadable (e.g. a foreign file): recompute and overwrite


def _save_cache(path: Path, name: str, features: torch.Tensor, stats: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: np.savez(tmp, key=np.array(name), features=features.numpy(), mu=stats["mu"],
                                            sigma=stats["sigma"]))


# ----------------------------------------------------------------------------------------------
# Inside training.


def as_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """Model output [B, C, H, W] (uint8, or float in [−1, 1], clamped) → uint8 [B, 3, H, W] on the CPU."""
    from models.sampler import to_uint8

    images = images.detach().cpu() if images.dtype == torch.uint8 else to_uint8(images)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class FidEvaluator:
    """FID/KID of a sampling function against a fixed reference: the extractor and the reference
    statistics are loaded once, so a training loop can call `evaluate` every `eval.fid_every` steps.

        evaluator = FidEvaluator("shards/digits", weights=None, device="cpu")
        evaluator.evaluate(lambda start, count: ema_model_samples(start, count), n=500)   # {"fid", "kid", ...}

    `sample_fn(start, count)` returns images start … start+count−1 as [count, C, H, W], uint8 or float in
    [−1, 1] (a fixed function of `start`, so scores at different steps see the same noise). The global
    RNG streams (CPU and the current CUDA device) are restored afterwards: evaluation never changes
    what training draws next.
    """

    def __init__(self, reference: str | Path | ShardLocation, weights: str | Path | None = None,
                 device: str | torch.device = "cpu", batch_size: int = 50,
                 cache_dir: str | Path | None = DEFAULT_CACHE, max_reference: int | None = None,
                 kid_subset_size: int = 1000, log: Callable[[str], None] = lambda message: None):
        self.weights = resolve_weights(weights)
        self.device, self.batch_size, self.kid_subset_size = torch.device(device), batch_size, kid_subset_size
        self.extractor = load_extractor(self.weights, self.device)
        images = open_image_set(reference, max_reference)
        self.reference, self.reference_stats, self.cached = reference_features(
            images, self.extractor, file_digest(self.weights), cache_dir, batch_size, log)

    def features(self, batches: Iterable[torch.Tensor]) -> torch.Tensor:
        """Inception features [N, 2048] of uint8 image batches [B, 3, H, W]."""
        return extract_features(self.extractor, batches)

    def evaluate(self, sample_fn: Callable[[int, int], torch.Tensor], n: int, seed: int = 0) -> dict:
        """FID and KID of `n` samples from `sample_fn(start, count)` against the reference; global RNG untouched."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            batches = (as_uint8_rgb(sample_fn(start, min(self.batch_size, n - start)))
                       for start in range(0, n, self.batch_size))
            features = self.features(batches)
        return scores(features, self.reference, self.reference_stats, kid_subset_size=self.kid_subset_size, seed=seed)
