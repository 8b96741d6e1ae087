"""Files that are complete or absent, and streamed digests: the one copy every writer of the project uses
(checkpoints, bundles, shards, image grids, results), so a crash never leaves a half-written file behind a
real name.

    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
    atomic_write_json(path, {"step": 10})
    file_digest(path)  # SHA-256 hex digest, read in 1 MiB blocks
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

TMP_MARK = ".tmp-"  # temporaries are named `.STEM.tmp-PID.SUFFIX` beside their target


def temporary_name(path: Path) -> Path:
    """The temporary file beside `path` that `atomic_write` fills before renaming it. It keeps `path`'s suffix,
    because some writers (np.savez, PIL) choose their format by it."""
    path = Path(path)
    return path.with_name(f".{path.stem}{TMP_MARK}{os.getpid()}{path.suffix}")


def atomic_write(path: str | Path, write: Callable[[Path], None], *, fsync: bool = True) -> None:
    """`write(tmp)` into a temporary file beside `path`, flush it to disk, then rename it onto `path`.

    A crash at any moment leaves `path` as it was (its old content, or absent) and at worst a stale temporary;
    an exception removes the temporary and propagates.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: str | Path, payload: Any, *, indent: int = 1, sort_keys: bool = True) -> None:
    """Write `payload` as strict JSON (NaN and infinities refused) to `path` atomically."""
    text = json.dumps(payload, indent=indent, sort_keys=sort_keys, allow_nan=False) + "\n"
    atomic_write_text(path, text)


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 1 MiB blocks (any size, constant memory)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
