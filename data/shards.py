"""Writing WebDataset tar shards, and reading their `index.json`.

Layout of a shard set written here::

    OUT/shard-000000.tar      samples 0 .. n-1       (members: 000000000.png, 000000000.cls, 000000000.json, ...)
    OUT/shard-000001.tar      ...
    OUT/index.json            {"num_samples", "size", "format", "has_labels", "shards": [{"name", "num_samples", "sha256"}]}

Each sample is a group of adjacent tar members sharing a key. Keys are zero-padded running
indices (`000012345`) because WebDataset splits a member name at its FIRST dot: a key must never
contain one. Members: the image (`.png`, or `.jpg` when a JPEG quality is given), the class label
as decimal text (`.cls`, only when the source has labels) and `{"name": <source file>}` (`.json`).
Shards are written by webdataset's `TarWriter` and read back by a plain `webdataset.WebDataset(urls)`
as well as by `data.stream`.

Nothing is ever half-written: shards are built in a hidden staging folder inside OUT (each one
under a temporary name, renamed when complete), moved into OUT only once all of them exist, and
`index.json` is written last through a temporary file + rename. On any error the staging folder
is removed, and so is OUT itself if this call created it.

An existing `index.json` in OUT is refused unless `overwrite=True` (`--overwrite`): then the old
set is replaced only after the new one has been fully built, so a failed rewrite keeps the old one.
"""
from __future__ import annotations

import io
import itertools
import json
import os
import random
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from models.files import atomic_write, atomic_write_json, file_digest
from trainer.errors import UserError

INDEX_NAME = "index.json"
IMAGE_CHANNELS = 3  # images are stored and read back as RGB (grey ones replicated), whatever the source
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"}
# What PIL raises on a file that is not a readable image (truncated, garbage, wrong suffix).
DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)
# Images with more pixels are skipped unread: a small file can decode to gigabytes (a 12,000 × 12,000 PNG of
# 140 KB). 8192 × 8192; PIL itself refuses more than 2 × its MAX_IMAGE_PIXELS (about 179 M) whatever this says.
DEFAULT_MAX_PIXELS = 8192 * 8192


def shard_name(index: int) -> str:
    """File name of shard `index` (shard-000012.tar)."""
    return f"shard-{index:06d}.tar"


def sample_key(index: int) -> str:
    """WebDataset key of sample `index` (nine digits)."""
    return f"{index:09d}"


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def encode_image(image: Image.Image | np.ndarray, image_format: str, quality: int | None) -> bytes:
    """Encode an RGB image ([H, W, 3] uint8 array or PIL image) as PNG (lossless) or JPEG."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    out = io.BytesIO()
    if image_format == "png":
        image.save(out, format="PNG", compress_level=6)
    else:
        image.save(out, format="JPEG", quality=quality or 95, subsampling=0)
    return out.getvalue()


def _prepare_output(output: Path, overwrite: bool) -> list[Path]:
    """Create `output` (and missing parents); return the folders this call created, outermost first."""
    output = Path(output)
    if (output / INDEX_NAME).exists() and not overwrite:
        raise UserError(f"{output} already holds a shard set ({INDEX_NAME}); pass --overwrite to replace it")
    missing = []
    probe = output
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UserError(f"cannot write output {output}: {probe} is not a directory")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create output directory {output}: {err.strerror or err}") from None
    if not os.access(output, os.W_OK | os.X_OK):
        _remove_created(list(reversed(missing)))
        raise UserError(f"output directory {output} is not writable")
    return list(reversed(missing))


def _remove_created(created: list[Path]) -> None:
    for folder in reversed(created):  # innermost first; only if nothing else appeared there
        try:
            folder.rmdir()
        except OSError:
            pass


def write_shards(
    samples: Iterable[tuple],
    output: Path,
    *,
    size: int,
    samples_per_shard: int = 256,
    quality: int | None = None,
    overwrite: bool = False,
    source: str = "",
) -> dict:
    """Write samples as tar shards plus `index.json` into `output`; return the index.

    samples: iterable of `(key, image)` or `(key, image, meta)`. `key` has no dot or slash;
        `image` is an S×S RGB PIL image, a [S, S, 3] uint8 array, or bytes already encoded in the
        target format (written verbatim); `meta` may hold `"cls"` (int label) and `"name"` (str).
    size: S, the side of every image (recorded in the index; PIL/array images are checked).
    quality: None → PNG (lossless); an int 1..100 → JPEG at that quality.
    """
    if samples_per_shard < 1:
        raise UserError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    if quality is not None and not 1 <= quality <= 100:
        raise UserError(f"--quality must be in 1..100, got {quality}")
    image_format = "png" if quality is None else "jpg"
    output = Path(output)
    created = _prepare_output(output, overwrite)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=output))
    try:
        shards, has_labels = _write_staged(samples, staging, size, samples_per_shard, image_format, quality)
        total = sum(s["num_samples"] for s in shards)
        if total == 0:
            raise UserError(f"no images to write from {source or 'the input'}")
        index = {
            "format_version": 1,
            "num_samples": total,
            "size": size,
            "format": image_format,
            "has_labels": has_labels,
            "samples_per_shard": samples_per_shard,
            "source": source,
            "shards": shards,
        }
        _publish(staging, output, index)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_created(created)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return index


def _write_staged(samples, staging: Path, size: int, per_shard: int, image_format: str,
                  quality: int | None) -> tuple[list[dict], bool]:
    """Write all shards into `staging`; return their index entries and whether labels were seen."""
    import webdataset as wds  # imports torch (1-2 s): only when there is something to write

    labels: dict[str, bool] = {}
    members = _encoded_members(samples, size, image_format, quality, labels)
    shards: list[dict] = []
    while (first := next(members, None)) is not None:
        path = staging / shard_name(len(shards))
        count = 0

        def write(tmp: Path) -> None:
            nonlocal count
            # webdataset's writer with fixed metadata (mtime 0, mode 0644, no user/group names), so the
            # same samples always give byte-identical shards (same sha256). One member per `write` call
            # keeps each sample's members in the order image, .cls, .json (a whole-sample write sorts
            # them by extension). Its ShardWriter is not used: it writes straight to the final names.
            with open(tmp, "wb") as stream, wds.TarWriter(stream, encoder=False, user="", group="",
                                                          mode=0o644, mtime=0) as tar:
                for key, sample in itertools.chain([first], itertools.islice(members, per_shard - 1)):
                    for ext, payload in sample:
                        tar.write({"__key__": key, ext: payload})
                    count += 1

        atomic_write(path, write)  # a shard only gets its real name once complete
        shards.append({"name": path.name, "num_samples": count, "sha256": file_digest(path)})
    return shards, labels.get("has_labels", False)


def _encoded_members(samples, size: int, image_format: str, quality: int | None,
                     labels: dict[str, bool]) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """`(key, [(extension, bytes), ...])` per sample; records in `labels` whether the samples carry labels."""
    for sample in samples:
        key, image = sample[0], sample[1]
        meta = sample[2] if len(sample) > 2 else {}
        if "." in key or "/" in key or not key:
            raise ValueError(f"sample key {key!r} must be non-empty and contain no '.' or '/'")
        if labels.setdefault("has_labels", "cls" in meta) != ("cls" in meta):
            raise ValueError(f"sample {key}: either every sample has a 'cls' label or none does")
        if not isinstance(image, (bytes, bytearray)):
            width, height = image.size if isinstance(image, Image.Image) else (image.shape[1], image.shape[0])
            if (width, height) != (size, size):
                raise ValueError(f"sample {key}: image is {width}x{height}, expected {size}x{size}")
            image = encode_image(image, image_format, quality)
        members = [(image_format, bytes(image))]
        if "cls" in meta:
            members.append(("cls", str(int(meta["cls"])).encode()))
        if "name" in meta:
            members.append(("json", json.dumps({"name": meta["name"]}).encode()))
        yield key, members


def _publish(staging: Path, output: Path, index: dict) -> None:
    """Move finished shards from `staging` into `output`, replacing an older set, index last."""
    old_index = output / INDEX_NAME
    old_names: set[str] = set()
    if old_index.exists():
        try:
            old_names = {s["name"] for s in json.loads(old_index.read_text())["shards"]}
        except (ValueError, KeyError, TypeError):
            pass
        old_index.unlink()  # from here on OUT is visibly "not a valid set" until the new index lands
    new_names = {s["name"] for s in index["shards"]}
    for name in old_names - new_names:
        (output / name).unlink(missing_ok=True)
    for name in sorted(new_names):
        os.replace(staging / name, output / name)
    atomic_write_json(output / INDEX_NAME, index, sort_keys=False)


# --------------------------------------------------------------------------------------------
# Image folder / zip → shards
# --------------------------------------------------------------------------------------------

def _is_image_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and Path(base).suffix.lower() in IMAGE_SUFFIXES


def list_image_files(path: Path) -> list[str]:
    """Relative names of the image files (by suffix) in a folder (recursive) or a .zip, sorted.

    Raises UserError when the path is missing, is not a folder or zip, or holds no image files.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"input {path} does not exist")
    if path.is_dir():
        names = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = sorted(n for n in archive.namelist() if not n.endswith("/") and "__MACOSX/" not in n)
    else:
        raise UserError(f"input {path} is neither a folder nor a .zip file")
    images = [n for n in names if _is_image_name(n)]
    if not images:
        others = f" (found {len(names)} other files, e.g. {names[0]})" if names else " (it is empty)"
        raise UserError(f"input {path} contains no image files{others}")
    return images


def center_crop_resize(image: Image.Image, size: int, name: str) -> Image.Image:
    """Center-crop to a square on the short side, then resize to size×size (Lanczos, antialiased).

    An image whose short side is below `size` is a UserError: upscaling would silently blur it
    (folders and zips skip such images before they get here).
    """
    width, height = image.size
    side = min(width, height)
    if side < size:
        raise UserError(f"image {name} is {width}x{height}, smaller than --size {size} on its short side")
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.LANCZOS, reducing_gap=3.0)
    return image


# Why a file of a folder/zip was skipped.
UNDECODABLE, TOO_SMALL, TOO_LARGE = "undecodable", "smaller than --size", "over --max-pixels"


def describe_skipped(skipped: dict[str, list[str]], examples: int = 3) -> str:
    """'1 undecodable: bad.jpg; 2 smaller than --size: a.png (50x12), b.png (8x8)' (a few names per reason)."""
    parts = []
    for reason, names in skipped.items():
        shown = ", ".join(names[:examples]) + (", ..." if len(names) > examples else "")
        parts.append(f"{len(names)} {reason}: {shown}")
    return "; ".join(parts)


class _FolderImages:
    """Iterates `(key, image, meta)` over the images of a folder/zip; files that are undecodable, over `max_pixels`
    pixels (judged from their header, before anything is decoded) or smaller than `size` on their short side are
    skipped and recorded by reason (`skipped`)."""

    def __init__(self, path: Path, size: int, seed: int | None, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.path = Path(path)
        self.size, self.max_pixels = size, max_pixels
        self.names = list_image_files(self.path)
        if seed is not None:  # shuffle so that shards are not ordered by folder/class
            random.Random(seed).shuffle(self.names)
        self.skipped: dict[str, list[str]] = {}  # reason -> file names (too small: with their size)

    @property
    def skipped_count(self) -> int:
        """Number of files skipped so far, over every reason."""
        return sum(len(names) for names in self.skipped.values())

    def _read_bytes(self) -> Iterator[tuple[str, bytes]]:
        if self.path.is_dir():
            for name in self.names:
                yield name, (self.path / name).read_bytes()
        else:
            with zipfile.ZipFile(self.path) as archive:
                for name in self.names:
                    yield name, archive.read(name)

    def __iter__(self):
        index = 0
        for name, payload in self._read_bytes():
            try:
                with warnings.catch_warnings():  # PIL warns of large images; the limit here is max_pixels
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    image = Image.open(io.BytesIO(payload))  # reads the header only
                if image.size[0] * image.size[1] > self.max_pixels:  # decoding it could take gigabytes
                    self.skipped.setdefault(TOO_LARGE, []).append(f"{name} ({image.size[0]}x{image.size[1]})")
                    continue
                image.load()
                image = image.convert("RGB")
            except DECODE_ERRORS:  # not fatal: counted and reported at the end
                self.skipped.setdefault(UNDECODABLE, []).append(name)
                continue
            if min(image.size) < self.size:  # never upscaled: it would blur; counted like an undecodable file
                self.skipped.setdefault(TOO_SMALL, []).append(f"{name} ({image.size[0]}x{image.size[1]})")
                continue
            image = center_crop_resize(image, self.size, f"{self.path}/{name}")
            yield sample_key(index), image, {"name": name}
            index += 1


def make_shards_from_path(input_path: Path, output: Path, size: int, *, samples_per_shard: int = 256,
                          quality: int | None = None, seed: int | None = None,
                          overwrite: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Shard an image folder (recursive) or .zip: center-crop, resize to size×size, encode.

    Files are chosen by suffix (.png .jpg .jpeg .bmp .webp .tif .tiff .gif .ppm; hidden files
    ignored). Files with an image suffix that PIL cannot decode, files of more than `max_pixels` pixels and
    images smaller than `size` on their short side are SKIPPED and counted (`skipped`: the total;
    `skipped_by_reason`: reason -> file names); an input with no usable image, and every other problem, is a
    UserError and leaves nothing behind. Returns {"shards", "samples", "skipped", "skipped_by_reason", "output"}.
    """
    if size < 1:
        raise UserError(f"--size must be >= 1, got {size}")
    if max_pixels < size * size:
        raise UserError(f"--max-pixels ({max_pixels}) is below --size² ({size * size}): no image could pass")
    images = _FolderImages(input_path, size, seed, max_pixels)
    try:
        index = write_shards(images, output, size=size, samples_per_shard=samples_per_shard,
                             quality=quality, overwrite=overwrite, source=str(input_path))
    except UserError:
        if images.skipped_count == len(images.names):  # nothing usable: say why
            raise UserError(f"no usable images in {input_path} (--size {size}): skipped "
                            f"{describe_skipped(images.skipped)}") from None
        raise
    return {"shards": len(index["shards"]), "samples": index["num_samples"],
            "skipped": images.skipped_count, "skipped_by_reason": images.skipped,
            "output": str(output)}


# --------------------------------------------------------------------------------------------
# Reading the index
# --------------------------------------------------------------------------------------------

def read_index(path: Path, verify_sha256: bool = False) -> dict:
    """Load and validate `index.json` of a shard set (`path` is the folder or the file itself).

    Raises UserError naming the file when it is missing, is not valid JSON, lacks a field,
    has inconsistent counts, or lists a shard that does not exist (or, with `verify_sha256`,
    whose checksum differs). Adds `"root"`: the folder holding the shards.
    """
    path = Path(path)
    index_path = path / INDEX_NAME if path.is_dir() or path.suffix != ".json" else path
    if not index_path.is_file():
        raise UserError(f"shard index {index_path} not found (make shards with scripts/make_shards.py)")
    try:
        index = json.loads(index_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"shard index {index_path} is not valid JSON: {err}") from None
    check_index(index, str(index_path))
    root = index_path.parent
    for entry in index["shards"]:
        shard = root / entry["name"]
        if not shard.is_file():
            raise UserError(f"shard index {index_path} lists {entry['name']}, which does not exist")
        if verify_sha256 and file_digest(shard) != entry["sha256"]:
            raise UserError(f"shard {shard} does not match the sha256 in {index_path}")
    index.setdefault("has_labels", False)
    index["root"] = str(root)
    return index


def check_index(index, where: str) -> None:
    """Validate the fields and counts of a loaded index (`where` names it in the UserError)."""
    fields = {"num_samples": int, "size": int, "format": str, "shards": list}
    for field, kind in fields.items():
        if not isinstance(index, dict) or not isinstance(index.get(field), kind):
            raise UserError(f"shard index {where}: missing or invalid field {field!r}")
    if index["format"] not in ("png", "jpg"):
        raise UserError(f"shard index {where}: unknown format {index['format']!r}")
    for entry in index["shards"]:
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                and isinstance(entry.get("num_samples"), int) and isinstance(entry.get("sha256"), str)):
            raise UserError(f"shard index {where}: invalid shard entry {entry!r}")
    total = sum(entry["num_samples"] for entry in index["shards"])
    if total != index["num_samples"] or not index["shards"]:
        raise UserError(f"shard index {where}: num_samples {index['num_samples']} but shards hold {total}")
