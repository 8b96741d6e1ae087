"""Small REAL datasets that ship inside installed packages: nothing is downloaded.

- `digits`: scikit-learn's 1,797 handwritten digits (8×8, 17 gray levels, labels 0-9).
  Gray levels 0..16 are mapped to 0..255, the 8×8 image is upsampled to S×S with bilinear
  interpolation (smooth strokes rather than 4×4 blocks, which suits a generative model better
  than nearest-neighbour), and the gray channel is replicated to RGB. S must be a multiple of 8.
- `photo-crops`: random square crops of the colour photographs bundled with scikit-image
  (astronaut, chelsea, coffee, rocket, immunohistochemistry, hubble_deep_field, motorcycle),
  resized to S×S with Lanczos. Crops are a pure function of (seed, count, S).

`materialize_shards(name, size, cache_dir)` writes either set as shards once and reuses them.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from data.shards import read_index, sample_key, write_shards
from trainer.errors import UserError

DATASETS = ("digits", "photo-crops")
PHOTO_CROPS_DEFAULT_COUNT = 512
# (skimage.data function, file it reads from the scikit-image install). Only files shipped in
# the wheel: others would need `pooch` and a network connection.
_PHOTOS = (
    ("astronaut", "astronaut.png"),
    ("chelsea", "chelsea.png"),
    ("coffee", "coffee.png"),
    ("rocket", "rocket.jpg"),
    ("immunohistochemistry", "ihc.png"),
    ("hubble_deep_field", "hubble_deep_field.jpg"),
    ("stereo_motorcycle", "motorcycle_left.png"),
)


def load_digits_images(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The scikit-learn digits as images [N=1797, size, size, 3] uint8 and labels [N] int64."""
    from sklearn.datasets import load_digits

    if size < 8 or size % 8:
        raise UserError(f"digits size must be a multiple of 8 (8, 16, 32, ...), got {size}")
    digits = load_digits()
    gray = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # [N, 8, 8]
    if size != 8:
        gray = np.stack([np.asarray(Image.fromarray(g).resize((size, size), Image.BILINEAR)) for g in gray])
    images = np.repeat(gray[..., None], 3, axis=-1)  # [N, S, S, 3]
    return np.ascontiguousarray(images), digits.target.astype(np.int64)


def _load_photos() -> list[np.ndarray]:
    """The bundled colour photographs, each [H, W, 3] uint8 (alpha dropped)."""
    import skimage.data

    folder = Path(os.path.dirname(skimage.data.__file__))
    photos = []
    for function, filename in _PHOTOS:
        if not (folder / filename).is_file():
            continue  # not shipped in this scikit-image version: never trigger a download
        image = getattr(skimage.data, function)()
        if function == "stereo_motorcycle":
            image = image[0]  # (left, right, disparity) → the left view
        photos.append(np.ascontiguousarray(image[..., :3]))
    if len(photos) < 3:
        raise UserError(f"scikit-image at {folder} ships only {len(photos)} of the expected photographs")
    return photos


def load_photo_crops(size: int = 64, count: int = PHOTO_CROPS_DEFAULT_COUNT, seed: int = 0) -> np.ndarray:
    """`count` random crops of the bundled photographs, resized to [count, size, size, 3] uint8.

    Crop i picks a photo uniformly, a side between half the photo's short side and all of it
    (but never below `size` when the photo allows, so 256×256 crops are not upscaled), and a
    uniform position. The result depends only on (size, count, seed).
    """
    if size < 1 or count < 1:
        raise UserError(f"photo-crops needs size >= 1 and count >= 1, got size={size}, count={count}")
    photos = _load_photos()
    rng = np.random.default_rng([seed, size, count])
    out = np.empty((count, size, size, 3), dtype=np.uint8)
    for i in range(count):
        photo = photos[rng.integers(len(photos))]
        height, width = photo.shape[:2]
        short = min(height, width)
        low = max(short // 2, min(size, short))
        side = int(rng.integers(low, short + 1))
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(0, width - side + 1))
        crop = Image.fromarray(photo[top:top + side, left:left + side])
        out[i] = np.asarray(crop.resize((size, size), Image.LANCZOS))
    return out


def _bundled_samples(name: str, size: int, count: int | None, seed: int):
    """(samples iterable for write_shards, samples_per_shard) for a bundled set."""
    if name == "digits":
        images, labels = load_digits_images(size)
        if count is not None:
            images, labels = images[:count], labels[:count]
        samples = ((sample_key(i), images[i], {"cls": int(labels[i])}) for i in range(len(images)))
        return samples, 128  # 1797 → 15 shards: enough for 2 ranks × 2 workers
    if name == "photo-crops":
        images = load_photo_crops(size, count or PHOTO_CROPS_DEFAULT_COUNT, seed)
        return ((sample_key(i), images[i]) for i in range(len(images))), 64
    raise UserError(f"unknown bundled dataset {name!r}; choose one of {', '.join(DATASETS)}")


def write_bundled_shards(name: str, size: int, output: Path, *, count: int | None = None, seed: int = 0,
                         samples_per_shard: int | None = None, quality: int | None = None,
                         overwrite: bool = False) -> dict:
    """Write a bundled set as shards into `output`; returns {"shards", "samples", "skipped", "output"}."""
    samples, default_per_shard = _bundled_samples(name, size, count, seed)
    index = write_shards(samples, output, size=size, samples_per_shard=samples_per_shard or default_per_shard,
                         quality=quality, overwrite=overwrite, source=f"bundled:{name}")
    return {"shards": len(index["shards"]), "samples": index["num_samples"], "skipped": 0, "output": str(output)}


def materialize_shards(name: str, size: int, cache_dir: Path, *, count: int | None = None, seed: int = 0) -> Path:
    """Shards of a bundled set in `cache_dir/<name>-<size>/`, written on first use; returns the folder.

    A non-default `count`/`seed` gets its own folder (`<name>-<size>-n<count>-s<seed>`). The set is
    built in a temporary sibling folder and renamed into place, so the folder either holds a
    complete set or does not exist. Two processes racing both build; the loser's rename fails,
    it deletes its copy and returns the winner's folder.
    """
    cache_dir = Path(cache_dir)
    suffix = "" if count is None and seed == 0 else f"-n{count or 'all'}-s{seed}"
    target = cache_dir / f"{name}-{size}{suffix}"
    if (target / "index.json").is_file():
        read_index(target)
        return target
    if target.exists():
        raise UserError(f"{target} exists but holds no index.json; delete it to rebuild the {name} shards")
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=cache_dir))
    try:
        write_bundled_shards(name, size, staging, count=count, seed=seed)
        try:
            os.rename(staging, target)  # atomic; fails if another process got there first
        except OSError:
            if not (target / "index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    read_index(target)
    return target
