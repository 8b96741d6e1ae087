"""FID and KID between samples and a reference set, through torch-fidelity, fully offline.

    python scripts/evaluate.py fid SAMPLES --ref REF [--weights PATH] [--kid-subset-size N] [--batch-size B]
                                   [--max-samples N] [--max-ref N] [--cache-dir DIR] [--device cpu|cuda]
                                   [--n N --temperature T --langevin-steps K --init prior|low-temp]   # bundles

SAMPLES: an image folder, an .npz (uint8 [N, H, W, C] or [N, C, H, W]), a folder of .npz chunks, or an
inference bundle (then --n images are drawn, image i depending only on (--seed, i) as in
scripts/sample.py). REF: a shard set (folder with index.json) or any of the image sets above.

The network is torch-fidelity's InceptionV3 ("inception-v3-compat": the TF FID graph inception-2015-12-05,
TF 1.x bilinear resize to 299, 2048-d pool features) with the weights file `--weights` (default
~/.cache/vaebm-trainer/fid/inception-v3-compat-2015-12-05.pth), made offline by `evaluate.py fid-weights`.
FID and KID are torch-fidelity's own functions on those features (KID: polynomial kernel of degree 3,
`--kid-subsets` subsets of `--kid-subset-size`, capped at the smaller set). The reference's features and
statistics are cached in --cache-dir, keyed by the reference's content (a shard set: its index.json,
which lists every shard's SHA-256) and the weights file's SHA-256: the second run skips the reference.
`--quick` caps the sets at 250 samples and 500 reference images (a smoke test; FID from few images is
biased upward, so compare such numbers only with each other).

Inside training, `FidEvaluator` (built once) scores a sampling function at an interval; see
trainer/eval_sections.py for the config.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from trainer.errors import UserError
from trainer.evaluation.image_sets import ImageSet, bundle_batches, is_bundle, open_image_set
from trainer.evaluation.inception import extract_features, file_digest, load_extractor, resolve_weights

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
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npz")  # np.savez keeps a name ending in .npz
    try:
        np.savez(tmp, key=np.array(name), features=features.numpy(), mu=stats["mu"], sigma=stats["sigma"])
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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

    def __init__(self, reference: str | Path, weights: str | Path | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 50, cache_dir: str | Path | None = DEFAULT_CACHE, max_reference: int | None = None,
                 kid_subset_size: int = 1000, log: Callable[[str], None] = lambda message: None):
        self.weights = resolve_weights(weights)
        self.device, self.batch_size, self.kid_subset_size = torch.device(device), batch_size, kid_subset_size
        self.extractor = load_extractor(self.weights, self.device)
        images = open_image_set(Path(reference), max_reference)
        self.reference, self.reference_stats, self.cached = reference_features(
            images, self.extractor, file_digest(self.weights), cache_dir, batch_size, log)

    def features(self, batches: Iterable[torch.Tensor]) -> torch.Tensor:
        return extract_features(self.extractor, batches)

    def evaluate(self, sample_fn: Callable[[int, int], torch.Tensor], n: int, seed: int = 0) -> dict:
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            batches = (as_uint8_rgb(sample_fn(start, min(self.batch_size, n - start)))
                       for start in range(0, n, self.batch_size))
            features = self.features(batches)
        return scores(features, self.reference, self.reference_stats, kid_subset_size=self.kid_subset_size, seed=seed)


def vae_sample_fn(vae, seed: int, temperature: float = 1.0) -> Callable[[int, int], torch.Tensor]:
    """sample_fn for FidEvaluator: decoder means μ_x [count, C, H, W] of VAE prior samples at
    `temperature`, with the model's current BN statistics; sample i's noise depends only on (seed, i)."""
    from models.langevin import PerChainNoise

    device = next(vae.parameters()).device

    def sample(start: int, count: int) -> torch.Tensor:
        eps_z = PerChainNoise.for_indices(seed, start, count).initial(vae.latent_shapes, device)
        return vae.decode(eps_z, None, temperature).x_mean

    return sample


def langevin_sample_fn(adapter, steps: int, step_size: float, seed: int, device) -> Callable[[int, int], torch.Tensor]:
    """sample_fn for FidEvaluator: VAEBM samples, the images of `steps` Langevin steps (the project's one
    sampler, models/langevin.py) on the energy `adapter` (trainer/energy_adapters.py); chain i's initial
    and Langevin noise depend only on (seed, i)."""
    from models.langevin import PerChainNoise, langevin

    def sample(start: int, count: int) -> torch.Tensor:
        chain_noise = PerChainNoise.for_indices(seed, start, count)
        with torch.enable_grad():  # Langevin needs ∇E even though evaluation runs under no_grad
            chains = langevin(chain_noise.initial(adapter.chain_shapes, device), adapter, steps, step_size, chain_noise)
        return adapter.images(chains.noise)

    return sample


def fid_of_sampler(sample_fn: Callable[[int, int], torch.Tensor], reference: str | Path, n: int,
                   weights: str | Path | None = None, **options) -> dict:
    """One-off `FidEvaluator(reference, weights, **options).evaluate(sample_fn, n)`."""
    return FidEvaluator(reference, weights, **options).evaluate(sample_fn, n)


# ----------------------------------------------------------------------------------------------
# The command.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("samples", type=Path, help="image folder, .npz, folder of .npz chunks, or inference bundle")
    parser.add_argument("--ref", type=Path, required=True, help="reference: shard set (index.json) or image folder/.npz")
    parser.add_argument("--weights", type=Path, default=None,
                        help="torch-fidelity InceptionV3 weights (default ~/.cache/vaebm-trainer/fid/"
                             "inception-v3-compat-2015-12-05.pth; make them with `evaluate.py fid-weights`)")
    parser.add_argument("--kid-subset-size", type=int, default=1000, help="KID subset size (capped at the smaller set)")
    parser.add_argument("--kid-subsets", type=int, default=100, help="number of KID subsets")
    parser.add_argument("--batch-size", type=int, default=50, help="images per Inception forward (and per sampling batch)")
    parser.add_argument("--max-samples", type=int, default=None, help="use only the first N samples")
    parser.add_argument("--max-ref", type=int, default=None, help="use only the first N reference images")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="reference statistics cache")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    bundle = parser.add_argument_group("when SAMPLES is an inference bundle")
    bundle.add_argument("--n", type=int, default=None, help="number of samples to draw (default: --max-samples)")
    bundle.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the bundle's)")
    bundle.add_argument("--langevin-steps", type=int, default=None, help="Langevin steps (default: the bundle's; 0 = VAE)")
    bundle.add_argument("--init", choices=("prior", "low-temp"), default="prior", help="chain initialization")


def sample_batches(args: argparse.Namespace, device: str, report) -> tuple[Iterable[torch.Tensor], str]:
    """The samples as uint8 batches, and a description of where they come from."""
    if not is_bundle(args.samples):
        images = open_image_set(args.samples, args.max_samples)
        return images.batches(args.batch_size), images.describe()
    from models import load_bundle
    from models.bundle import BundleError, SamplingOptionError

    n = args.n if args.n is not None else args.max_samples
    if n is None or n < 2:
        raise UserError(f"{args.samples} is an inference bundle: give --n, the number of samples to draw (>= 2)")
    try:
        sampler = load_bundle(args.samples, device=device)
        options = sampler.options(args.langevin_steps, None, args.temperature, args.init)
    except (BundleError, SamplingOptionError) as err:
        raise UserError(str(err)) from None
    if not sampler.is_image:
        raise UserError(f"{args.samples} holds a 2-D toy model: FID needs images")
    report.log(f"sampling {n} images from {args.samples} ({options.as_dict()})")
    batches = bundle_batches(sampler, n, args.batch_size, args.seed, steps=options.steps,
                             step_size=options.step_size, temperature=options.temperature, init=options.init)
    return batches, f"bundle {args.samples}, {n} samples, seed {args.seed}, {options.as_dict()}"


def run(args: argparse.Namespace, report) -> dict:
    if args.batch_size < 1 or args.kid_subset_size < 2 or args.kid_subsets < 1:
        raise UserError("--batch-size must be >= 1, --kid-subset-size >= 2 and --kid-subsets >= 1")
    if args.quick:  # a smoke test within minutes on 2 CPU cores; FID from so few images is biased upward
        args.max_samples = args.max_samples or QUICK_SAMPLES
        args.max_ref = args.max_ref or QUICK_REFERENCE
    weights = resolve_weights(args.weights)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    reference_images = open_image_set(args.ref, args.max_ref)
    batches, described = sample_batches(args, device, report)
    extractor = load_extractor(weights, device)
    weights_sha256 = file_digest(weights)
    reference, reference_stats, cached = reference_features(reference_images, extractor, weights_sha256,
                                                            args.cache_dir, args.batch_size, report.log)
    report.log(f"sample features of {described} ...")
    kept = []

    def keep_first(batches):  # a grid of the first samples for --run-dir, without a second pass
        for batch in batches:
            if sum(len(b) for b in kept) < 64:
                kept.append(batch[:64])
            yield batch

    features = extract_features(extractor, keep_first(batches))
    result = scores(features, reference, reference_stats, kid_subset_size=args.kid_subset_size,
                    kid_subsets=args.kid_subsets, seed=args.seed)
    if kept:
        report.image("samples", torch.cat(kept)[:64].float(), value_range=(0.0, 255.0))
    return {**result, "samples": described, "reference": reference_images.describe(), "reference_cached": cached,
            "weights": str(weights), "weights_sha256": weights_sha256, "network": NETWORK, "device": device}
