"""What both official importers share: safe reading of `torch.save` files, state-dict mapping checked both
ways, provenance, and the atomic write of the imported run directory."""
from __future__ import annotations

import argparse
import os
import pickle
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from models.files import file_digest
from models.nvae.official import official_aliases
from trainer.config.loader import save_config
from trainer.errors import UserError
from trainer.run.checkpoint import CheckpointSaver


def load_official(path: str | Path, what: str) -> dict:
    """The dict a `torch.save` file holds, loaded with `weights_only=True` (+ argparse.Namespace).

    UserError for a missing file, a file torch cannot read, or one holding any other Python object
    (the safe loader refuses it before anything is constructed).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{what} checkpoint '{path}' does not exist")
    if not hasattr(torch.serialization, "safe_globals"):
        raise UserError(f"importing official checkpoints needs torch >= 2.5 (torch.serialization.safe_globals); "
                        f"this is torch {torch.__version__}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if unsafe:
            raise UserError(f"{what} checkpoint '{path}' holds a Python object of type {unsafe.group(1)}; "
                            f"refusing to unpickle it (only tensors and argparse.Namespace are loaded)") from None
        raise UserError(f"{what} checkpoint '{path}' is not a readable torch checkpoint: "
                        f"{_first_line(err)}") from None
    except Exception as err:  # not a torch file at all: zip/pickle errors of many types
        raise UserError(f"{what} checkpoint '{path}' is not a readable torch checkpoint: {_first_line(err)}") from None
    if not isinstance(data, dict):
        raise UserError(f"'{path}' is not an official {what} checkpoint: it holds a {type(data).__name__}, not a dict")
    return data


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[-1] if text else ''}"[:300]


def tensor_dict(value: Any, where: str) -> dict[str, torch.Tensor]:
    """`value` if it is a non-empty dict of tensors; UserError naming `where` otherwise."""
    if not isinstance(value, dict) or not value or not all(isinstance(v, torch.Tensor) for v in value.values()):
        raise UserError(f"{where} is not a state dict of tensors")
    return value



# ----------------------------------------------------------------------------------------------
# Tensors: official names → ours, checked both ways.


def check_aliases(official: dict[str, torch.Tensor], where: str) -> dict[str, str]:
    """The `*.weight_normalized` aliases, each checked to be its weight again (shape, and values
    unless the tensors are shapes only, on the meta device)."""
    aliases = official_aliases(official)
    for alias, target in aliases.items():
        if target not in official:
            raise UserError(f"{where}: '{alias}' aliases '{target}', which the state dict does not hold")
        a, b = official[alias], official[target]
        if a.shape != b.shape or (not a.is_meta and not b.is_meta and not torch.equal(a, b)):
            raise UserError(f"{where}: '{alias}' differs from '{target}' (expected the same tensor twice)")
    return aliases


def map_state(official: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rename, where: str,
              skip=lambda name: False, target: str = "the network its args describe") -> dict[str, torch.Tensor]:
    """Rename an official state dict with `rename` (dict → dict, KeyError for a name it cannot place)
    and check it against `expected` (ours, the state dict of `target`): every name of ours filled unless
    `skip(name)`, nothing left over, shapes equal. Tensors are cast to our dtypes. Returns ours-named tensors."""
    aliases = check_aliases(official, where)
    try:
        renamed = rename({k: v for k, v in official.items() if k not in aliases})
    except KeyError as err:
        raise UserError(f"{where}: {err.args[0]} (its args do not describe its tensors?)") from None
    missing = [k for k in expected if k not in renamed and not skip(k)]
    unexpected = [k for k in renamed if k not in expected]
    if missing or unexpected:
        parts = ([f"{len(missing)} tensor(s) of ours not filled, e.g. {missing[:3]}"] if missing else []) \
            + ([f"{len(unexpected)} official tensor(s) with no place, e.g. {unexpected[:3]}"] if unexpected else [])
        raise UserError(f"{where} does not map onto {target}: {'; '.join(parts)}")
    out = {}
    for name, tensor in renamed.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise UserError(f"{where}: tensor for '{name}' has shape {list(tensor.shape)}, ours has "
                            f"{list(expected[name].shape)}")
        out[name] = tensor.to(expected[name].dtype)
    return out


# ----------------------------------------------------------------------------------------------
# The imported run directory.


def write_imported_run(out: Path, cfg: Any, step: int, shared: dict[str, Any], note: str) -> Path:
    """Write `config.yaml`, `log.txt` and one checkpoint (`shared` files, no per-process state) into a
    staging directory, then rename it to `out`. `out` must not exist or be an empty directory."""
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out '{out}' already exists and is not empty; choose a new run directory")
    staging = out.parent / f".{out.name}.importing-{os.getpid()}"
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        save_config(cfg, staging / "config.yaml")
        saver = CheckpointSaver(staging, rank=0, world_size=1, is_main=True, barrier=lambda: None, keep=2)
        checkpoint = saver.save(step, shared=shared, per_rank={})
        (checkpoint / "rank-0").rmdir()  # the saver makes it; an imported checkpoint has no per-process state
        (staging / "log.txt").write_text(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {note}\n")
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"cannot write run directory '{out}': {err.strerror or err}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def provenance(path: Path, kind: str, **extra) -> dict[str, Any]:
    """The `imported` entry of state.json: what was imported from where."""
    return {"format": kind, "source": str(Path(path).expanduser().resolve()),
            "sha256": file_digest(Path(path).expanduser()), **extra}
