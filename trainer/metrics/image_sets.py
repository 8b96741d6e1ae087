"""Image sets for FID: what `evaluate.py fid` reads, as uint8 batches [B, 3, H, W] in a fixed order.

    images = open_image_set(Path("samples/"), max_images=500)   # folder, .npz, shard set, npz chunks
    for batch in images.batches(50): ...                          # uint8 [B, 3, H, W]
    images.identity()                                             # content hash (cache key of references)

Accepted paths:
- a folder of images (PNG, JPEG, ...; the files directly inside it, sorted by name: `scripts/sample.py`'s
  `chains/` subfolder is ignored). Any mode is converted to RGB.
- an `.npz` file: the array `samples`, else `images`, else the first 4-D array; uint8 [N, H, W, C] or
  [N, C, H, W] with C = 1 or 3 (gray is repeated to RGB).
- a folder of `.npz` files (e.g. `scripts/sample.py --format npz` chunks), read in name order.
- a shard set (a folder with `index.json`, from `scripts/make_shards.py`, or a remote
  `data.sources.ShardLocation`): decoded in index order; unreadable samples are skipped and counted.
Inference bundles are sampled, not read: see `bundle_batches`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image

from data.shards import DECODE_ERRORS, IMAGE_SUFFIXES, INDEX_NAME
from data.sources import ShardLocation, open_shard_set
from trainer.errors import UserError

BUNDLE_MANIFEST = "bundle.json"  # models.bundle.MANIFEST (not imported: it pulls in the NVAE)
NPZ_KEYS = ("samples", "images")


@dataclass
class ImageSet:
    """A finite, ordered set of images. `read()` yields them one by one as uint8 [H, W, 3]."""

    kind: str                                   # "folder" | "npz" | "shards"
    path: Path | ShardLocation
    read_all: Callable[[], Iterator[np.ndarray]]
    files: list[Path] = field(default_factory=list)  # what `identity` hashes (folder / npz files)
    max_images: int | None = None
    skipped: int = 0                            # unreadable shard samples seen so far

    def read(self) -> Iterator[np.ndarray]:
        """The images one by one as uint8 [H, W, 3], at most `max_images`."""
        return islice(self.read_all(), self.max_images)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """uint8 [B, 3, H, W] batches of at most `batch_size`; a change of image size starts a new batch."""
        pending: list[np.ndarray] = []
        for image in self.read():
            if pending and (len(pending) == batch_size or image.shape != pending[0].shape):
                yield _stack(pending)
                pending = []
            pending.append(image)
        if pending:
            yield _stack(pending)

    def identity(self) -> str:
        """SHA-256 naming exactly these images: the shard index (it lists every shard's SHA-256), or the
        names and bytes of the files, plus the image cap."""
        digest = hashlib.sha256(f"{self.kind}\n{self.max_images}\n".encode())
        if self.kind == "shards":
            index = open_shard_set(self.path)
            for key in ("root", "cache_dir"):  # where the set is read from is not what it holds
                index.pop(key, None)
            for entry in index["shards"]:
                entry.pop("url", None)
            digest.update(json.dumps(index, sort_keys=True).encode())
            return digest.hexdigest()
        for path in self.files:
            digest.update(f"{path.name}\n".encode())
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        return digest.hexdigest()

    def describe(self) -> str:
        """The set in words: kind, path and cap."""
        cap = f", first {self.max_images}" if self.max_images is not None else ""
        return f"{self.kind} {self.path}{cap}"


def _stack(images: list[np.ndarray]) -> torch.Tensor:
    """B arrays [H, W, 3] uint8 → [B, 3, H, W] uint8."""
    return torch.from_numpy(np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2)))


def is_bundle(path: Path) -> bool:
    """True if `path` is an inference bundle directory (it holds the bundle manifest)."""
    return Path(path).is_dir() and (Path(path) / BUNDLE_MANIFEST).is_file()


def open_image_set(path: Path | ShardLocation, max_images: int | None = None) -> ImageSet:
    """The images at `path` (see the module doc); UserError when there are none or the path is unusable."""
    if max_images is not None and max_images < 1:
        raise UserError(f"the image cap must be >= 1, got {max_images}")
    if isinstance(path, ShardLocation):
        return _shard_set(path, max_images)
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if path.is_file():
        if path.suffix != ".npz":
            raise UserError(f"{path} is a file but not an .npz; give an image folder, an .npz or a shard set")
        return ImageSet("npz", path, lambda: _read_npz_files([path]), files=[path], max_images=max_images)
    if (path / INDEX_NAME).is_file():
        return _shard_set(path, max_images)
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if images:
        return ImageSet("folder", path, lambda: _read_image_files(images), files=images, max_images=max_images)
    arrays = [p for p in files if p.suffix == ".npz"]
    if arrays:
        return ImageSet("npz", path, lambda: _read_npz_files(arrays), files=arrays, max_images=max_images)
    raise UserError(f"{path} holds no images, .npz files or {INDEX_NAME} (found {len(files)} other files)")


def _read_image_files(files: list[Path]) -> Iterator[np.ndarray]:
    for path in files:
        try:
            with Image.open(path) as image:
                yield np.asarray(image.convert("RGB"))
        except DECODE_ERRORS as err:
            raise UserError(f"{path} is not a readable image ({type(err).__name__}: {err})") from None


def npz_images(path: Path) -> np.ndarray:
    """The image array of one .npz as uint8 [N, H, W, 3] (see the module doc for the key and layouts)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            key = next((k for k in NPZ_KEYS if k in data.files), None)
            if key is None:
                key = next((k for k in data.files if data[k].ndim == 4), None)
            if key is None:
                raise UserError(f"{path} holds no image array (no '{NPZ_KEYS[0]}' or '{NPZ_KEYS[1]}' key and no 4-D "
                                f"array among {', '.join(data.files) or 'nothing'})")
            array = data[key]
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable .npz ({type(err).__name__}: {err})") from None
    if array.dtype != np.uint8 or array.ndim != 4:
        raise UserError(f"{path}: '{key}' must be uint8 images [N, H, W, C] or [N, C, H, W], "
                        f"got {array.dtype} {tuple(array.shape)}")
    if array.shape[-1] not in (1, 3):
        if array.shape[1] not in (1, 3):
            raise UserError(f"{path}: '{key}' has shape {tuple(array.shape)}: neither [N, H, W, C] nor "
                            f"[N, C, H, W] with C = 1 or 3")
        array = array.transpose(0, 2, 3, 1)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return array


def _read_npz_files(files: list[Path]) -> Iterator[np.ndarray]:
    for path in files:
        yield from npz_images(path)


def _shard_set(path: Path | ShardLocation, max_images: int | None) -> ImageSet:
    from data.stream import decode_image, read_shard

    index = open_shard_set(path)

    def read_all() -> Iterator[np.ndarray]:
        images.skipped = 0
        for shard in index["shards"]:
            for _key, payload, _label, _problem in read_shard(shard["url"], shard["num_samples"], index["format"],
                                                              sha256=shard["sha256"], cache_dir=index["cache_dir"],
                                                              name=shard["name"]):
                try:
                    image = decode_image(payload, index["size"]) if payload is not None else None
                except DECODE_ERRORS:
                    image = None
                if image is None:
                    images.skipped += 1
                    continue
                yield image

    images = ImageSet("shards", path, read_all, max_images=max_images)
    return images


def bundle_batches(sampler, n: int, batch_size: int, seed: int, **options) -> Iterator[torch.Tensor]:
    """n samples of a loaded bundle (`models.load_bundle`) as uint8 [B, 3, H, W] batches.

    Image i is image i of `scripts/sample.py BUNDLE --seed seed` with the same options (steps,
    temperature, init, step_size): it depends only on (seed, i).
    """
    from models.sampler import to_uint8

    for start in range(0, n, batch_size):
        out = sampler.sample_indices(range(start, min(n, start + batch_size)), seed, **options)
        images = to_uint8(out.mean)
        yield images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
