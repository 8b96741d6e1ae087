"""Export a training run (NVAE-only or VAEBM) to a self-contained inference bundle.

    python scripts/export.py RUN_DIR --out BUNDLE [--step N] [--ema | --raw] [--temperatures 0.6,0.7,0.8,1.0]
                             [--bn-passes 500] [--bn-batch-size 16] [--device cpu|cuda] [--overwrite]

The bundle holds the VAE (and, for a VAEBM run, the energy network and the VAE that `vae.path` of
the run's config resolves to) as safetensors, the BN statistics readjusted at each temperature, the
model configs, the preset's sampling defaults and the source run/step (see models/bundle.py).
Written atomically. User mistakes print `error: ...` and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from trainer.cli import run_cli  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line of export.py."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="an NVAE or VAEBM run directory")
    parser.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--ema", dest="weights", action="store_const", const="ema",
                         help="EMA weights of the VAE (default for NVAE runs)")
    weights.add_argument("--raw", dest="weights", action="store_const", const="raw", help="raw weights of the VAE")
    parser.add_argument("--temperatures", default="0.6,0.7,0.8,1.0",
                        help="temperatures to readjust BN statistics at (comma-separated)")
    parser.add_argument("--bn-passes", type=int, default=500, help="sampling passes per temperature (official: 500)")
    parser.add_argument("--bn-batch-size", type=int, default=16, help="batch of each pass (official: 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the readjustment passes")
    parser.add_argument("--device", default=None, help="device for the readjustment (default: cuda if available)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    return parser.parse_args(argv)  # weights None: NVAE runs → ema; VAEBM runs → the run's vae.weights


def main(argv: list[str] | None = None) -> int:
    """Export a run's checkpoint to an inference bundle (BN statistics readjusted per temperature); returns 0."""
    args = parse_args(argv)
    import torch

    from trainer.export import export_run, parse_temperatures

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    export_run(args.run_dir, args.out, step=args.step, weights=args.weights,
               temperatures=parse_temperatures(args.temperatures), bn_passes=args.bn_passes,
               bn_batch_size=args.bn_batch_size, seed=args.seed, device=device, overwrite=args.overwrite,
               log=lambda line: print(line, file=sys.stderr))
    return 0


if __name__ == "__main__":
    run_cli(main)
