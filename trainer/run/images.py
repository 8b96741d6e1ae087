"""Image grids: [-1, 1] float images to uint8 grids, written to PNG atomically."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image

from models.files import atomic_write
from models.sampler import to_uint8  # noqa: F401 (one conversion for grids, samples and bundles)


def make_grid(images: torch.Tensor, ncol: int, pad: int = 1) -> torch.Tensor:
    """[N, C, H, W] uint8 → one [C, rows·(H+pad), ncol·(W+pad)] grid, filling missing cells with 0."""
    images = images.cpu()
    n = images.shape[0]
    rows = -(-n // ncol)
    if rows * ncol > n:
        filler = torch.zeros((rows * ncol - n, *images.shape[1:]), dtype=images.dtype)
        images = torch.cat([images, filler])
    images = torch.nn.functional.pad(images, (0, pad, 0, pad))
    return rearrange(images, "(r c) ch h w -> ch (r h) (c w)", c=ncol)


def save_png(grid: torch.Tensor, path: Path) -> None:
    """Write a uint8 [C, H, W] image (C = 1 or 3) as PNG, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = grid.permute(1, 2, 0).numpy()
    if array.shape[2] == 1:
        array = array[:, :, 0]
    atomic_write(path, lambda tmp: Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG"))
