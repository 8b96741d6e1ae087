"""Files that are complete or absent, and streamed digests: the one copy every writer of the project uses
(checkpoints, bundles, shards, image grids, results), so a crash never leaves a half-written file behind a
real name.

    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
    atomic_write_json(path, {"step": 10})
    file_digest(path)  # SHA-256 hex digest, read in 1 MiB blocks
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # a full device or quota (as trainer.errors; the bundle loader
# imports nothing from the trainer)

TMP_MARK = ".tmp-"  # temporaries are named `.STEM.tmp-PID.SUFFIX` beside their target
# How writers that wrap the OS error report a full device: safetensors ("No space left on device (os error 28)"),
# torch.save's C++ stream ("file write failed", "basic_ios::clear: iostream error").
_NO_SPACE_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "StorageFull")
_WRAPPED_WRITE_FAILURE = ("file write failed", "iostream error", "basic_ios")


def temporary_name(path: Path) -> Path:
    """The temporary file beside `path` that `atomic_write` fills before renaming it. It keeps `path`'s suffix,
    because some writers (np.savez, PIL) choose their format by it."""
    path = Path(path)
    return path.with_name(f".{path.stem}{TMP_MARK}{os.getpid()}{path.suffix}")


def atomic_write(path: str | Path, write: Callable[[Path], None], *, fsync: bool = True) -> None:
    """`write(tmp)` into a temporary file beside `path`, flush it to disk, then rename it onto `path`.

    A crash at any moment leaves `path` as it was (its old content, or absent) and at worst a stale temporary;
    an exception removes the temporary and propagates.
    A full device (however the writer reports it) is raised as `OSError(ENOSPC)` naming `path`.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except Exception as err:
        if is_no_space(err, path.parent):
            tmp.unlink(missing_ok=True)  # give the space back before anyone reads the error
            code = err.errno if isinstance(err, OSError) and err.errno in NO_SPACE_ERRNOS else errno.ENOSPC
            raise OSError(code, os.strerror(code), str(path)) from err
        raise
    finally:
        tmp.unlink(missing_ok=True)


def is_no_space(err: BaseException, folder: Path) -> bool:
    """Whether a failed write into `folder` failed for lack of space: ENOSPC/EDQUOT, a writer's wrapped report of
    it, or a C++ stream failure while the device is full (less than 1 MiB available)."""
    chain, seen = [], set()
    while err is not None and id(err) not in seen:  # torch.save raises a second error while cleaning up
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or err.__context__
    if any(isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS for e in chain):
        return True
    text = " ".join(str(e) for e in chain)
    if any(mark in text for mark in _NO_SPACE_TEXT):
        return True
    if any(mark in text for mark in _WRAPPED_WRITE_FAILURE):
        try:
            return shutil.disk_usage(folder).free < (1 << 20)
        except OSError:
            return False
    return False


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
