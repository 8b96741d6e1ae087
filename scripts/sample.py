"""Draw samples from an inference bundle: one file per image, resumable, on one or many processes.

    python scripts/sample.py BUNDLE --n 50000 --out samples/ [--batch-size 64] [--chunk 64] [--steps K] [--step-size η]
                             [--temperature t] [--init prior|low-temp] [--seed 0] [--format png|npz]
                             [--chains-every k] [--device cuda|cpu] [--autocast no|bf16] [--metropolis yes|no]
    accelerate launch --num_processes 8 scripts/sample.py BUNDLE --n 50000 --out samples/

Image i depends only on (seed, i): its chain's noise comes from its own generator, and the networks run on
chunks of exactly `--chunk` chains (padded), so the files are bit-identical whatever the batch size or the
number of processes (on one kind of device with one thread count; the chunk size is part of the settings). Process `rank` of `world` (RANK / WORLD_SIZE / LOCAL_RANK, as set by accelerate launch
or torchrun; no process group is formed) writes the indices i with i % world == rank. Re-running the
command skips files already written; `OUT/sampling.json` records the settings and the SHA-256 of the weights,
and a rerun with other settings or other weights into the same OUT is refused. The bundle's files are verified
against their SHA-256 digests before anything is sampled; `--no-verify` skips that (trusted bundles only).

PNG files are `OUT/{i:06d}.png`: the decoder mean of the final state, mapped to [0, 255] by clamping
[−1, 1] (the official VAEBM script min–max rescaled each image on its own instead). `--chains-every k`
also writes `OUT/chains/{i:06d}.png`, chain i's decoder means every k Langevin steps in one row.
`--format npz` (the default for 2-D toy bundles) writes chunks `OUT/points-{start:06d}.npz` of 1000
consecutive indices (chunk c goes to process c % world) holding `index`, and `images` (uint8) for image
bundles or `points` (the decoder samples the energy scores) and `means` for toy bundles.
Defaults (steps, step size, temperature) come from the bundle. User mistakes print `error: ...` and
exit with status 2.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from models.files import atomic_write, atomic_write_json  # noqa: E402
from trainer.errors import UserError  # noqa: E402
from trainer.cli import run_cli  # noqa: E402

NPZ_CHUNK = 1000
SETTINGS = "sampling.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line of sample.py."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path, help="bundle directory written by scripts/export.py")
    parser.add_argument("--n", type=int, required=True, help="number of samples (indices 0 … n−1)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--batch-size", type=int, default=64, help="chains per batch and process")
    parser.add_argument("--chunk", type=int, default=None,
                        help="chains per network evaluation (default: the bundle's, 64); images depend on it, "
                             "never on --batch-size or the number of processes")
    parser.add_argument("--steps", type=int, default=None, help="Langevin steps (default: the bundle's; 0 = VAE only)")
    parser.add_argument("--step-size", type=float, default=None, help="Langevin step size η (default: the bundle's)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="prior init: temperature of the generator (default: the bundle's, 1); "
                             "low-temp init: temperature of the initial VAE draw (default 0.7)")
    parser.add_argument("--init", choices=("prior", "low-temp"), default="prior",
                        help="chain initialization: ε ~ N(0, I), or encoded low-temperature VAE samples (App. E)")
    parser.add_argument("--seed", type=int, default=0, help="image i depends only on (seed, i)")
    parser.add_argument("--format", choices=("png", "npz"), default=None, help="png (images) or npz (default for toys)")
    parser.add_argument("--chains-every", type=int, default=0, help="also write each chain's states every k steps")
    parser.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when CUDA is available, else cpu")
    parser.add_argument("--autocast", choices=("no", "bf16"), default=None, help="Langevin energy passes in bf16")
    parser.add_argument("--metropolis", choices=("yes", "no"), default=None,
                        help="Metropolis-adjusted Langevin steps (default: the bundle's, as the energy was trained)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the SHA-256 check of the bundle's files (trusted, very large bundles only)")
    return parser.parse_args(argv)


def process_slot() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the environment accelerate launch / torchrun set."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"bad process slot: RANK={rank}, WORLD_SIZE={world}")
    return rank, world, local


def check_settings(out: Path, settings: dict, rank: int) -> None:
    """Refuse to mix samples made with different settings; rank 0 records them on first use."""
    path = out / SETTINGS
    if path.is_file():
        previous = json.loads(path.read_text())
        changed = [key for key in sorted(set(previous) | set(settings)) if previous.get(key) != settings.get(key)]
        if changed:
            key = changed[0]
            raise UserError(f"'{out}' holds samples made with other settings ({key}: {previous.get(key)!r} there, "
                            f"{settings.get(key)!r} now); use another --out")
    elif rank == 0:
        atomic_write_json(path, settings)


def batches(items: list, size: int):
    """Yield consecutive slices of `items` of at most `size` elements."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def write_pngs(out: Path, result, chains: bool) -> None:
    """Write each sampled image as OUT/INDEX.png (and its chain grid under chains/ first when asked)."""
    import torch

    from models.sampler import to_uint8
    from trainer.run.images import make_grid, save_png

    images = to_uint8(result.mean)
    for j, i in enumerate(result.indices):
        if chains:  # before the image: an image on disk means its chain grid is there too
            frames = to_uint8(torch.stack([frame[j] for frame in result.frames]))
            save_png(make_grid(frames, ncol=len(result.frames)), out / "chains" / f"{i:06d}.png")
        save_png(images[j], out / f"{i:06d}.png")


def npz_chunk_done(path: Path, indices: list[int]) -> bool:
    """True if the .npz at `path` exists and holds exactly these sample indices."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            return np.array_equal(data["index"], np.asarray(indices))
    except (OSError, KeyError, ValueError):
        return False


def write_npz(path: Path, results: list, is_image: bool, chains: bool) -> None:
    """Write one chunk of samples (images, or points and means; chain frames when asked) to .npz, atomically."""
    import numpy as np
    import torch

    from models.sampler import to_uint8

    arrays = {"index": np.asarray([i for r in results for i in r.indices], dtype=np.int64)}
    if is_image:
        arrays["images"] = torch.cat([to_uint8(r.mean) for r in results]).numpy()
    else:
        arrays["points"] = torch.cat([r.sample for r in results]).numpy()
        arrays["means"] = torch.cat([r.mean for r in results]).numpy()
    if chains:
        arrays["frames"] = torch.cat([torch.stack(r.frames, dim=1) for r in results]).numpy()
        arrays["frame_steps"] = np.asarray(results[0].frame_steps, dtype=np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: np.savez(tmp, **arrays))


def main(argv: list[str] | None = None) -> int:
    """Draw this process's share of the samples from a bundle, skipping those already on disk; returns 0."""
    args = parse_args(argv)
    if args.n < 0 or args.batch_size < 1 or args.chains_every < 0 or (args.chunk is not None and args.chunk < 1):
        raise UserError("--n must be >= 0, --batch-size >= 1, --chunk >= 1 and --chains-every >= 0")
    rank, world, local_rank = process_slot()
    import torch
    from tqdm import tqdm

    from models.bundle import MANIFEST, BundleError, SamplingOptionError, load_bundle

    device = args.device or (f"cuda:{local_rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")
    try:
        sampler = load_bundle(args.bundle, device=device, verify=not args.no_verify)
        metropolis = None if args.metropolis is None else args.metropolis == "yes"
        options = sampler.options(args.steps, args.step_size, args.temperature, args.init, args.autocast, metropolis)
    except (BundleError, SamplingOptionError) as err:
        raise UserError(str(err)) from None
    if args.chunk is not None:
        sampler.chunk = args.chunk
    fmt = args.format or ("png" if sampler.is_image else "npz")
    if fmt == "png" and not sampler.is_image:
        raise UserError("this bundle holds a 2-D toy model: use --format npz")
    chains = args.chains_every > 0
    if chains and options.steps == 0:
        print("note: no Langevin steps, so each chain grid holds its one state", file=sys.stderr)

    out = args.out.expanduser()
    out.mkdir(parents=True, exist_ok=True)
    settings = {"bundle_sha256": hashlib.sha256((args.bundle / MANIFEST).read_bytes()).hexdigest(),
                "weights_sha256": sampler.file_sha256, "seed": args.seed, "format": fmt,
                "chains_every": args.chains_every, "chunk": sampler.chunk, **options.as_dict()}
    check_settings(out, settings, rank)
    kwargs = dict(steps=options.steps, step_size=options.step_size, temperature=options.temperature,
                  init=options.init, autocast=options.autocast, metropolis=options.metropolis,
                  chains_every=args.chains_every)

    # The work of this process: indices (png) or chunks of indices (npz), minus what is on disk.
    if fmt == "png":
        mine = range(rank, args.n, world)
        todo = [i for i in mine if not (out / f"{i:06d}.png").is_file()]
        chunks = []
        total = len(todo)
    else:
        mine, chunks = [], []
        for c in range(rank, -(-args.n // NPZ_CHUNK), world):
            indices = list(range(c * NPZ_CHUNK, min(args.n, (c + 1) * NPZ_CHUNK)))
            mine += indices
            path = out / f"points-{c * NPZ_CHUNK:06d}.npz"
            if not npz_chunk_done(path, indices):
                chunks.append((path, indices))
        total = sum(len(indices) for _, indices in chunks)
    skipped = len(mine) - total

    start = time.perf_counter()
    progress = tqdm(total=total, unit="img", dynamic_ncols=True, disable=rank != 0 or total == 0,
                    desc=f"sampling ({world} process{'es' if world > 1 else ''})")
    if fmt == "png":
        for batch in batches(todo, args.batch_size):
            result = sampler.sample_indices(batch, args.seed, **kwargs)
            write_pngs(out, result, chains)
            progress.update(len(batch))
    else:
        for path, indices in chunks:
            results = []
            for batch in batches(indices, args.batch_size):
                results.append(sampler.sample_indices(batch, args.seed, **kwargs))
                progress.update(len(batch))
            write_npz(path, results, sampler.is_image, chains)
    progress.close()
    elapsed = time.perf_counter() - start
    rate = total / elapsed if elapsed > 0 and total else 0.0
    print(f"rank {rank}/{world}: wrote {total} sample(s), skipped {skipped} already in {out}, "
          f"{rate:.2f} img/s (steps {options.steps}, init {options.init}, temperature {options.temperature:g}, "
          f"device {device})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
