"""Write WebDataset tar shards (+ index.json) from an image folder/zip or a bundled dataset.

    python scripts/make_shards.py --input DIR_OR_ZIP --output OUT --size 256 [--samples-per-shard 256]
                                  [--quality 95] [--seed 0] [--overwrite] [--max-pixels N]
    python scripts/make_shards.py --dataset digits|photo-crops --output OUT [--size S] [--count N]

Images are center-cropped to a square and resized to S×S, stored as lossless PNG, or JPEG when
--quality is given. Undecodable files, images smaller than S on their short side (never upscaled: it
would blur them) and files of more than --max-pixels pixels (judged from their header, never decoded)
are skipped, and the summary line counts them by reason with a few of their names; an input with no
usable image is an error. An OUT that already holds index.json is refused unless --overwrite is given.
User mistakes print `error: ...` and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from data.bundled import DATASETS, write_bundled_shards  # noqa: E402
from data.shards import DEFAULT_MAX_PIXELS, describe_skipped, make_shards_from_path  # noqa: E402
from trainer.errors import UserError  # noqa: E402
from trainer.cli import run_cli  # noqa: E402

DEFAULT_SIZES = {"digits": 32, "photo-crops": 64}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line of make_shards.py."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", type=Path, help="image folder (searched recursively) or .zip")
    source.add_argument("--dataset", choices=DATASETS, help="a bundled dataset instead of --input")
    parser.add_argument("--output", type=Path, required=True, help="folder for shard-*.tar and index.json")
    parser.add_argument("--size", type=int, help="image side S (required with --input)")
    parser.add_argument("--samples-per-shard", type=int,
                        help="default 256 for --input, 128 for digits, 64 for photo-crops")
    parser.add_argument("--quality", type=int, help="store JPEG at this quality instead of PNG")
    parser.add_argument("--seed", type=int,
                        help="--input: shuffle file order with this seed (default: sorted); photo-crops: crop seed")
    parser.add_argument("--count", type=int, help="bundled datasets: number of images")
    parser.add_argument("--overwrite", action="store_true", help="replace a shard set already in --output")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help=f"--input: skip images of more pixels, unread (default {DEFAULT_MAX_PIXELS}: 8192²)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Write shards and index.json from an image folder/zip (--input) or a bundled dataset; returns 0."""
    args = parse_args(argv)
    if args.input is not None:
        if args.size is None:
            raise UserError("--size is required with --input")
        if args.count is not None:
            raise UserError("--count only applies to --dataset")
        summary = make_shards_from_path(args.input, args.output, args.size,
                                        samples_per_shard=args.samples_per_shard or 256, quality=args.quality,
                                        seed=args.seed, overwrite=args.overwrite, max_pixels=args.max_pixels)
    else:
        summary = write_bundled_shards(args.dataset, args.size or DEFAULT_SIZES[args.dataset], args.output,
                                       count=args.count, seed=args.seed or 0,
                                       samples_per_shard=args.samples_per_shard, quality=args.quality,
                                       overwrite=args.overwrite)
    reasons = summary.get("skipped_by_reason")
    print(f"wrote {summary['shards']} shards, {summary['samples']} samples, skipped {summary['skipped']}"
          f"{f' ({describe_skipped(reasons)})' if reasons else ''} -> {summary['output']}")
    return 0


if __name__ == "__main__":
    run_cli(main)
