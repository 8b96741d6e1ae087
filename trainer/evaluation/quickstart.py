"""The quick start's picture and its measurements (`scripts/quickstart.py`, README "Quick start").

    summary = draw_quickstart(out, nvae_dir, vaebm_dir, toy_vae_dir, toy_vaebm_dir, device, temperature=0.7, ...)

One PNG, `OUT/quickstart.png`, in three bands:
1. digits from the data and the NVAE's reconstructions of them;
2. NVAE samples (temperature t, BN statistics readjusted at t) and the same chains after VAEBM's Langevin
   steps (the low-temperature initialization of VAEBM App. E: each sample is encoded into (ε_z, ε_x) and
   Langevin runs from there), drawn through an exported bundle exactly as `scripts/sample.py` draws them;
3. 25-Gaussians (VAEBM §5.4, Figure 4): data, VAE samples, VAEBM samples by Langevin in ε-space.

"Recognizable" is measured on more chains than are shown: the share of samples that the project's digit
classifier (trained on the digits' training split, `digit_classifier.py`) labels with probability ≥ `confident`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from data.bundled import load_digits_images
from data.toy2d import Gaussians25
from models.adapters import VAEBMEnergy
from models.bundle import load_bundle
from models.langevin import seeded_chains
from models.sampler import to_uint8
from trainer.config.loader import read_yaml
from trainer.ebm.sources import load_frozen_vae, load_trained_energy
from trainer.evaluation.digit_classifier import load_or_train_classifier
from trainer.evaluation.report import density_image
from trainer.evaluation.toy_likelihood import near_mode_fraction
from trainer.export import export_run
from trainer.run.images import save_png

CELL = 64                 # pixels per digit in the picture
GAP = 4                   # white pixels between digits
MEASURED_CHAINS = 256     # chains behind the recognizable shares
TOY_POINTS = 20_000       # points per 25-Gaussians panel
TOY_EXTENT = 3.0          # the panels show [−3, 3]²


def draw_quickstart(out: Path, nvae_dir: Path, vaebm_dir: Path, toy_vae_dir: Path, toy_vaebm_dir: Path, device, *,
                    temperature: float, bn_passes: int, columns: int, confident: float, seed: int = 0,
                    toy_points: int = TOY_POINTS) -> dict:
    """Write `out/quickstart.png`; return the measured shares (see the module docstring). `toy_points` points
    per 25-Gaussians panel (its Langevin chains are most of the picture's time)."""
    bundle = out / f"bundle-t{temperature:g}"
    if not (bundle / "bundle.json").is_file():
        export_run(vaebm_dir, bundle, temperatures=(temperature,), bn_passes=bn_passes, seed=seed,
                   log=lambda line: None)
    sampler = load_bundle(bundle, device=device)
    size = sampler.vae.image_shape[-1]
    judge = load_or_train_classifier(size, seed, out / "classifier", log=lambda line: None)

    # Chains 0 … MEASURED_CHAINS−1: VAE samples at t, and the same chains after Langevin.
    chains = range(MEASURED_CHAINS)
    vae_samples = to_uint8(sampler.sample_indices(chains, seed, steps=0, temperature=temperature).mean)
    langevin = to_uint8(sampler.sample_indices(chains, seed, init="low-temp", temperature=temperature).mean)
    shares = {"nvae_recognizable": recognizable(judge, vae_samples, confident),
              "langevin_recognizable": recognizable(judge, langevin, confident)}

    data, reconstructions = reconstruct(nvae_dir, size, columns, device)
    toy = toy_panels(toy_vae_dir, toy_vaebm_dir, seed, toy_points)
    bands = [
        ("data digits  /  NVAE reconstructions", [grid_row(data), grid_row(reconstructions)]),
        (f"NVAE samples (t = {temperature:g})  /  the same chains after {sampler.defaults['steps']} "
         f"Langevin steps of VAEBM", [grid_row(vae_samples[:columns]), grid_row(langevin[:columns]),
                                      grid_row(vae_samples[columns:2 * columns]),
                                      grid_row(langevin[columns:2 * columns])]),
        ("25-Gaussians (VAEBM paper, Sec. 5.4):  data  /  VAE samples  /  VAEBM samples", [toy["row"]]),
    ]
    save_png(compose(bands), out / "quickstart.png")
    return {**shares, "toy_vae_near_mode": toy["vae_near_mode"], "toy_vaebm_near_mode": toy["vaebm_near_mode"],
            "toy_data_near_mode": toy["data_near_mode"], "temperature": temperature,
            "langevin_steps": sampler.defaults["steps"], "measured_chains": MEASURED_CHAINS,
            "toy_points": toy_points, "classifier_accuracy": judge.accuracy, "confidence": confident}


def recognizable(judge, images: torch.Tensor, confident: float) -> float:
    """Share of uint8 images [N, C, H, W] the classifier labels with probability ≥ `confident`."""
    probabilities = torch.softmax(judge.logits(images), dim=1)
    return float((probabilities.max(dim=1).values >= confident).float().mean())


@torch.no_grad()
def reconstruct(nvae_dir: Path, size: int, count: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` digits (uint8 [count, 3, S, S]) and the NVAE's reconstructions of them (decoder means)."""
    vae, _ = load_frozen_vae(nvae_dir, "ema", device)
    images, _ = load_digits_images(size)
    data = torch.from_numpy(images[:count]).permute(0, 3, 1, 2).contiguous()
    x = data.float().to(device) / 127.5 - 1.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        reconstruction = vae(x).x_mean
    return data, to_uint8(reconstruction)


def toy_panels(vae_dir: Path, vaebm_dir: Path, seed: int, points: int) -> dict:
    """Density images of `points` 25-Gaussians data, VAE samples and VAEBM Langevin samples each, side by side
    [3, H, 3W]."""
    vae, _ = load_frozen_vae(vae_dir, "ema", "cpu")
    energy = load_trained_energy(vaebm_dir, "cpu")
    langevin_cfg = read_yaml(vaebm_dir / "config.yaml")["langevin"]
    truth = Gaussians25()
    adapter = VAEBMEnergy(vae, energy)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        data = truth.sample(points, generator)
        vae_points = vae.sample(points, generator=generator).x_sample
    _, final = seeded_chains(adapter, 0, points, seed=seed, steps=langevin_cfg["sample_steps"],
                             step_size=langevin_cfg["step_size"], metropolis=langevin_cfg.get("metropolis", False))
    with torch.no_grad():
        vaebm_points = adapter.negatives(final)
    panels = [density_image(points, TOY_EXTENT, 3 * CELL) for points in (data, vae_points, vaebm_points)]
    gap = torch.ones(1, 3 * CELL, CELL // 4)
    row = torch.cat([panels[0], gap, panels[1], gap, panels[2]], dim=2)  # [1, H, W] in [0, 1]
    return {"row": (row * 255).round().to(torch.uint8).expand(3, -1, -1),
            "data_near_mode": near_mode_fraction(truth, data), "vae_near_mode": near_mode_fraction(truth, vae_points),
            "vaebm_near_mode": near_mode_fraction(truth, vaebm_points)}


def grid_row(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [N, C, S, S] → one row [3, CELL, N·(CELL + GAP) − GAP], each image scaled to CELL pixels
    (nearest), with a white gap between images so that each digit reads on its own."""
    images = images.expand(-1, 3, -1, -1).float()
    scaled = F.interpolate(images, size=(CELL, CELL), mode="nearest").round().to(torch.uint8)
    gap = torch.full((3, CELL, GAP), 255, dtype=torch.uint8)
    cells = [piece for image in scaled for piece in (image, gap)][:-1]
    return torch.cat(cells, dim=2)


def compose(bands: list[tuple[str, list[torch.Tensor]]], margin: int = 8) -> torch.Tensor:
    """Stack titled bands of uint8 rows [3, h, w] into one white picture [3, H, W] with the titles drawn in."""
    width = max(row.shape[2] for _, rows in bands for row in rows) + 2 * margin
    font = ImageFont.load_default()
    title_height = 18
    height = sum(title_height + sum(row.shape[1] + 2 for row in rows) + margin for _, rows in bands) + margin
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = margin
    for title, rows in bands:
        draw.text((margin, y + 3), title, fill="black", font=font)
        y += title_height
        for row in rows:
            array = np.ascontiguousarray(row.permute(1, 2, 0).numpy())
            canvas.paste(Image.fromarray(array), (margin, y))
            y += row.shape[1] + 2
        y += margin
    return torch.from_numpy(np.array(canvas)).permute(2, 0, 1).contiguous()
