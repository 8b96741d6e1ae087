"""Sampling throughput of an inference bundle: VAE-only sampling vs VAEBM with K Langevin steps.

    bench_sample("bundles/digits", n=64, batch_size=16, steps=16)
    → {"vae_img_per_s": …, "vaebm_img_per_s": …, "slowdown": vae/vaebm, …}

Both measurements go through `BundleSampler.sample_indices` (what `scripts/sample.py` runs: per-chain
noise, decode of the final state), after one warm-up batch each, with the device synchronized
before the clock is read. Prior initialization at the bundle's temperature.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from models.bundle import load_bundle


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _images_per_second(sampler, n: int, batch_size: int, steps: int) -> float:
    sampler.sample_indices(range(min(batch_size, n)), seed=1, steps=steps)  # warm-up (kernels, allocator)
    _synchronize(sampler.device)
    start = time.perf_counter()
    for first in range(0, n, batch_size):
        sampler.sample_indices(range(first, min(n, first + batch_size)), seed=0, steps=steps)
    _synchronize(sampler.device)
    return n / (time.perf_counter() - start)


def bench_sample(bundle_path: str | Path, n: int, batch_size: int, steps: int | None = None,
                 device: str | torch.device | None = None) -> dict:
    """Images/s of VAE-only sampling (0 steps) and, for a VAEBM bundle, of VAEBM sampling with `steps`
    Langevin steps (None: the bundle's default), and their ratio `slowdown` = VAE img/s ÷ VAEBM img/s.

    For an NVAE-only bundle the VAEBM entries are None.
    """
    if n < 1 or batch_size < 1:
        raise ValueError("n and batch_size must be >= 1")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    sampler = load_bundle(bundle_path, device=device)
    steps = int(sampler.defaults.get("steps", 0)) if steps is None else steps
    vae_rate = _images_per_second(sampler, n, batch_size, steps=0)
    vaebm_rate = None
    if sampler.energy_net is not None and steps > 0:
        vaebm_rate = _images_per_second(sampler, n, batch_size, steps=steps)
    return {
        "bundle": str(bundle_path), "kind": sampler.kind, "device": str(sampler.device), "n": n,
        "batch_size": batch_size, "steps": steps, "image_shape": list(sampler.vae.image_shape),
        "vae_img_per_s": vae_rate, "vaebm_img_per_s": vaebm_rate,
        "slowdown": None if vaebm_rate is None else vae_rate / vaebm_rate,
    }
