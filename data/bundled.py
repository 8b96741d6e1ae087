"""Small REAL datasets that ship inside installed packages: nothing is downloaded.

- `digits`: scikit-learn's 1,797 handwritten digits (8×8, 17 gray levels, labels 0-9).
  Gray levels 0..16 are mapped to 0..255, the 8×8 image is upsampled to S×S with bilinear
  interpolation (smooth strokes rather than 4×4 blocks, which suits a generative model better
  than nearest-neighbour), and the gray channel is replicated to RGB. S must be a multiple of 8.
- `photo-crops`: random square crops of the colour photographs bundled with scikit-image
  (astronaut, chelsea, coffee, rocket, immunohistochemistry, hubble_deep_field, motorcycle),
  resized to S×S with Lanczos. Crops are a pure function of (seed, count, S).

- `digits-train` / `digits-test`: the fixed stratified 80/20 split of `digits` (`digits_split`). Every
  model the evaluation experiments train sees `digits-train` only; `digits-test` is the held-out set
  (digit classifier accuracy, Fréchet distance reference, OOD in-distribution scores).
- `stacked-digits`: StackedMNIST on digits (VAEBM Table 5): each RGB channel is an independent
  uniformly drawn `digits-train` image, so the label (100·r + 10·g + b) takes 1,000 values.
  A pure function of (size, count, seed); 20,000 images by default.

`materialize_shards(name, size, cache_dir)` writes any of these sets as shards once and reuses them.
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

DATASETS = ("digits", "photo-crops", "digits-train", "digits-test", "stacked-digits")
PHOTO_CROPS_DEFAULT_COUNT = 512
DIGITS_TEST_FRACTION = 0.2    # of each class, held out (360 of the 1,797 digits)
DIGITS_SPLIT_SEED = 0         # fixed on purpose: one split for every experiment and cache
STACKED_DIGITS_DEFAULT_COUNT = 20_000
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


def digits_split(labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) into the 1,797 digits: per class, a fixed random 20% is held out.

    The one split used everywhere (datasets `digits-train`/`digits-test`, `stacked-digits`, the
    evaluation experiments), so no model is ever trained on a digit it is evaluated on.
    """
    if labels is None:
        _, labels = load_digits_images(8)
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    test = []
    for digit in range(10):
        members = np.flatnonzero(labels == digit)
        test.append(rng.permutation(members)[:int(round(DIGITS_TEST_FRACTION * len(members)))])
    test = np.sort(np.concatenate(test))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


def load_digits_split(split: str, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """One side of `digits_split`: images [N, size, size, 3] uint8 and labels [N] (split "train" or "test")."""
    if split not in ("train", "test"):
        raise UserError(f"digits split must be 'train' or 'test', got {split!r}")
    images, labels = load_digits_images(size)
    train, test = digits_split(labels)
    chosen = train if split == "train" else test
    return images[chosen], labels[chosen]


def load_stacked_digits(size: int = 32, count: int = STACKED_DIGITS_DEFAULT_COUNT,
                        seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stacked digits: images [count, size, size, 3] uint8 and labels [count] in 0..999.

    Channel c of image i is the grey `digits-train` image picked[i, c] (uniform, independent), and
    the label is 100·digit_r + 10·digit_g + digit_b. Depends only on (size, count, seed).
    """
    if count < 1:
        raise UserError(f"stacked-digits needs count >= 1, got {count}")
    gray, labels = load_digits_split("train", size)
    gray = gray[..., 0]  # [N, S, S]: the three channels of a bundled digit are equal
    picked = np.random.default_rng([seed, size, count]).integers(len(gray), size=(count, 3))
    images = np.stack([gray[picked[:, c]] for c in range(3)], axis=-1)  # [count, S, S, 3]
    stacked_labels = labels[picked] @ np.array([100, 10, 1])
    return np.ascontiguousarray(images), stacked_labels.astype(np.int64)


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
    if name in ("digits-train", "digits-test"):
        images, labels = load_digits_split(name.split("-")[1], size)
        if count is not None:
            images, labels = images[:count], labels[:count]
        samples = ((sample_key(i), images[i], {"cls": int(labels[i])}) for i in range(len(images)))
        return samples, 96  # 1437 train images → 15 shards, as many as `digits`
    if name == "stacked-digits":
        images, labels = load_stacked_digits(size, count or STACKED_DIGITS_DEFAULT_COUNT, seed)
        samples = ((sample_key(i), images[i], {"cls": int(labels[i])}) for i in range(len(images)))
        return samples, 1000
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
