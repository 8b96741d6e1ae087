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

The metric library (features, statistics, the reference cache, `FidEvaluator`) is `trainer/metrics/fid.py`.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterable

import torch

from models.files import file_digest
from trainer.errors import UserError
from trainer.metrics.fid import DEFAULT_CACHE, NETWORK, QUICK_REFERENCE, QUICK_SAMPLES, reference_features, scores
from trainer.metrics.image_sets import bundle_batches, is_bundle, open_image_set
from trainer.metrics.inception import extract_features, load_extractor, resolve_weights

# ----------------------------------------------------------------------------------------------
# The command.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of `evaluate.py fid`: samples, reference, weights, sizes, cache and device."""
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
    """Score samples (images, .npz or a bundle) against a reference set; returns FID, KID and what was compared."""
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
