"""Checkpoints: atomic, complete or absent, resumable to the step, loaded without unpickling.

Layout of one checkpoint, `RUN/checkpoints/step-NNNNNNN/`:

    manifest.json          step, world size, file list — written last; its presence marks completion
    model.safetensors      trained weights and buffers (the unwrapped module)
    ema.safetensors        EMA weights and buffers (when the trainer keeps an EMA)
    optimizer.pt           optimizer state (tensors and numbers only: loaded with weights_only=True)
    state.json             trainer state: step, counters, anything JSON-serializable
    rank-R/                per-process state: RNG streams (rng.pt), data-stream position (data.json),
                           replay buffers and other per-rank tensors (*.safetensors)

Every process writes into `step-NNNNNNN.tmp/`; after a barrier the main process writes the manifest and
renames the folder into place. A crash mid-write leaves only a `.tmp` folder, which the next save
removes and `latest_checkpoint` ignores. Old checkpoints are pruned to `keep` (never fewer than 2).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from models.files import atomic_write, atomic_write_json
from trainer.errors import UserError
from trainer.run.launch import seed_everything

STEP_DIR = re.compile(r"^step-(\d{7})$")
MANIFEST = "manifest.json"


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    found = []
    if root.is_dir():
        for path in root.iterdir():
            match = STEP_DIR.match(path.name)
            if match and (path / MANIFEST).is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1][1] if checkpoints else None


# ----------------------------------------------------------------------------------------------
# Small file helpers: every file is written to a temporary name, flushed, then renamed.


def write_json(path: Path, data: Any) -> None:
    """Strict JSON (no NaN), atomically."""
    atomic_write_json(path, data)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors needs contiguous, unshared tensors: clone what is shared or strided."""
    clean = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(clean, str(tmp)))


def write_torch(path: Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def read_torch(path: Path) -> Any:
    """Load a torch file of tensors and plain values only; never unpickles arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint file '{path}' is missing") from None
    except Exception as err:  # corrupt, or holding objects we refuse to unpickle
        raise UserError(f"checkpoint file '{path}' cannot be loaded safely: {type(err).__name__}") from None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise UserError(f"checkpoint file '{path}' is missing") from None
    except Exception as err:
        raise UserError(f"checkpoint file '{path}' is not a valid safetensors file: {err}") from None


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"checkpoint file '{path}' is missing") from None
    except json.JSONDecodeError as err:
        raise UserError(f"checkpoint file '{path}' is not valid JSON: {err}") from None


# ----------------------------------------------------------------------------------------------
# RNG state of one process, in a form `weights_only=True` can load.


def rng_state() -> dict:
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), np_state[2], np_state[3], np_state[4]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Saving and pruning.


class CheckpointSaver:
    """Writes checkpoints collectively. Call `save` on every process with the same step.

    `barrier` synchronizes the processes (e.g. `accelerator.wait_for_everyone`); `is_main` and
    `rank` say which process this is.
    """

    def __init__(self, run_dir: Path, *, rank: int, world_size: int, is_main: bool,
                 barrier: Callable[[], None], keep: int):
        self.root = Path(run_dir) / "checkpoints"
        self.rank, self.world_size, self.is_main = rank, world_size, is_main
        self.barrier = barrier
        self.keep = max(2, keep)

    def save(self, step: int, *, shared: dict[str, Any], per_rank: dict[str, Any],
             collective: Callable[[Path], None] | None = None) -> Path:
        """Write one checkpoint. `shared` is written by the main process, `per_rank` by every one.

        Keys are file names; a value is written by its suffix: `.safetensors` (dict of tensors),
        `.json` (JSON data), `.pt` (tensors and plain values, for `weights_only` loading).
        `collective(staging_dir)` runs on every process (e.g. a DeepSpeed engine's sharded save).
        """
        final = self.root / checkpoint_name(step)
        staging = self.root / f"{checkpoint_name(step)}.tmp"
        if self.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if staging.exists():
                shutil.rmtree(staging)  # left by a crash mid-save
            staging.mkdir()
        self.barrier()
        if collective is not None:
            collective(staging)
        if self.is_main:
            for name, value in shared.items():
                _write_by_suffix(staging / name, value)
        rank_dir = staging / f"rank-{self.rank}"
        rank_dir.mkdir(exist_ok=True)
        for name, value in per_rank.items():
            _write_by_suffix(rank_dir / name, value)
        self.barrier()
        if self.is_main:
            files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
            write_json(staging / MANIFEST, {"step": step, "world_size": self.world_size, "files": files})
            if final.exists():  # the same step saved again (e.g. a rerun that did no new steps)
                shutil.rmtree(final)
            os.replace(staging, final)
            self._prune()
        self.barrier()
        return final

    def _prune(self) -> None:
        for _, path in list_checkpoints(self.root.parent)[: -self.keep]:
            shutil.rmtree(path, ignore_errors=True)


def _write_by_suffix(path: Path, value: Any) -> None:
    if path.suffix == ".safetensors":
        write_tensors(path, value)
    elif path.suffix == ".json":
        write_json(path, value)
    elif path.suffix == ".pt":
        write_torch(path, value)
    else:
        raise ValueError(f"unknown checkpoint file type: {path.name}")


class Checkpoint:
    """Read access to one complete checkpoint directory."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not (self.path / MANIFEST).is_file():
            raise UserError(f"'{self.path}' is not a complete checkpoint (no {MANIFEST})")
        self.manifest = read_json(self.path / MANIFEST)
        self.step = int(self.manifest["step"])
        self.world_size = int(self.manifest["world_size"])

    def has(self, name: str) -> bool:
        return (self.path / name).is_file()

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        return read_tensors(self.path / name)

    def json(self, name: str) -> Any:
        return read_json(self.path / name)

    def torch(self, name: str) -> Any:
        return read_torch(self.path / name)

    def rank_file(self, rank: int, name: str) -> Path:
        return self.path / f"rank-{rank}" / name


# ----------------------------------------------------------------------------------------------
# What both loops do around their own files: DeepSpeed shards, and the per-process state.


def deepspeed_save(engine) -> Callable[[Path], None]:
    """The collective part of a checkpoint under DeepSpeed: the engine's own sharded state, in `deepspeed/`."""
    return lambda staging: engine.save_checkpoint(str(staging / "deepspeed"), tag="state")


def is_imported(checkpoint: Checkpoint) -> bool:
    """Whether the checkpoint came from `scripts/import_official.py` (it then holds no per-process state)."""
    return "imported" in checkpoint.json("state.json")


def check_resumable(checkpoint: Checkpoint, launch) -> None:
    """Refuse a checkpoint this launch cannot resume: another number of processes (its data positions, RNG
    streams and replay buffers are per process), or another launcher (DeepSpeed or not). An imported checkpoint
    resumes on any number of processes."""
    processes = launch.accelerator.num_processes
    if checkpoint.world_size != processes and not is_imported(checkpoint):
        raise UserError(f"checkpoint '{checkpoint.path}' was written by {checkpoint.world_size} process(es); "
                        f"this launch has {processes}")
    was_deepspeed = bool(checkpoint.json("state.json").get("deepspeed", False))
    if was_deepspeed != launch.deepspeed:
        raise UserError(f"checkpoint '{checkpoint.path}' was written {'with' if was_deepspeed else 'without'} "
                        f"DeepSpeed; resume it the same way (or start a new run from its weights)")


def restore_process_state(checkpoint: Checkpoint, rank: int, stream, fresh_seed: int) -> None:
    """This process's data-stream position and RNG streams. An imported checkpoint has neither: the stream
    starts fresh and the process is seeded with `fresh_seed`, as a new run would be."""
    if is_imported(checkpoint):
        seed_everything(fresh_seed)
        return
    stream.load_state_dict(checkpoint.json(f"rank-{rank}/data.json"))
    set_rng_state(checkpoint.torch(f"rank-{rank}/rng.pt"))
