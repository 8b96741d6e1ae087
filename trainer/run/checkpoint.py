"""Checkpoints: atomic, complete or absent, resumable to the step, loaded without unpickling.

Layout of one checkpoint, `RUN/checkpoints/step-NNNNNNN/`:

    manifest.json          step, world size, file list, each file's size and SHA-256 — written last; its
                           presence marks completion
    model.safetensors      trained weights and buffers (the unwrapped module)
    ema.safetensors        EMA weights and buffers (when the trainer keeps an EMA)
    optimizer.pt           optimizer state (tensors and numbers only: loaded with weights_only=True)
    state.json             trainer state: step, counters, anything JSON-serializable
    rank-R/                per-process state: RNG streams (rng.pt), data-stream position (data.json),
                           replay buffers and other per-rank tensors (*.safetensors)

Every process writes into `step-NNNNNNN.tmp/`; after a barrier the main process writes the manifest and
renames the folder into place. A crash mid-write leaves only a `.tmp` folder, which `latest_checkpoint`
ignores and the run's next start removes (`remove_stale_temporaries`). A process that fails to write (a full
device) makes every process fail the save together; the staging folder is removed and the checkpoints already
complete are untouched. Old checkpoints are pruned to `keep` (never fewer than 2). No checkpoint holding a
non-finite weight is written.

Reading back: `verify_checkpoint` checks a checkpoint before it is trusted (the manifest's fields against the
folder it sits in, every file's size and SHA-256, state.json, finite weights); `select_resume_checkpoint` moves
one that fails aside to `checkpoints/corrupt/` and falls back to the newest that verifies.
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
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models.files import TMP_MARK, atomic_write, atomic_write_json, file_digest
from trainer.errors import UserError, one_line
from trainer.run.launch import seed_everything

STEP_DIR = re.compile(r"^step-(\d{7})$")
MANIFEST = "manifest.json"
CORRUPT_DIR = "corrupt"  # RUN/checkpoints/corrupt/step-NNNNNNN-<reason>: checkpoints that failed verification
STAGING = re.compile(r"^step-\d{7}\.tmp$")
# The networks' weights: never written, nor trusted, holding a non-finite value.
WEIGHT_FILES = ("model.safetensors", "ema.safetensors", "energy.safetensors", "vae.safetensors")


class CorruptCheckpoint(UserError):
    """A checkpoint that failed verification (its files do not match its manifest, or hold garbage).
    `kind` names the failure in a word or two (the name a checkpoint moved aside gets)."""

    def __init__(self, message: str, kind: str = "corrupt"):
        super().__init__(message)
        self.kind = kind


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint at `step` (step-0001234)."""
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
    """The newest complete checkpoint of a run, or None if it has none."""
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
    """Write `obj` with torch.save, atomically."""
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
    """Load a safetensors file to CPU tensors; UserError if it is missing or invalid."""
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise UserError(f"checkpoint file '{path}' is missing") from None
    except Exception as err:
        raise UserError(f"checkpoint file '{path}' is not a valid safetensors file: {err}") from None


def read_json(path: Path) -> Any:
    """Load a UTF-8 JSON file; UserError if it is missing or invalid."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise UserError(f"checkpoint file '{path}' is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"checkpoint file '{path}' is not valid JSON: {one_line(str(err), 200)}") from None


# ----------------------------------------------------------------------------------------------
# RNG state of one process, in a form `weights_only=True` can load.


def rng_state() -> dict:
    """Snapshot of the torch, Python, NumPy (and CUDA) RNG states, as tensors and plain values only."""
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
    """Restore the RNG states captured by `rng_state`."""
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
    `rank` say which process this is. `any_failed(flag)` (e.g. `collective.any_rank`) tells every process
    whether any process failed a phase of the save, so a process that cannot write (a full device) makes
    all of them stop together instead of leaving the others waiting at a barrier.
    """

    def __init__(self, run_dir: Path, *, rank: int, world_size: int, is_main: bool,
                 barrier: Callable[[], None], keep: int, any_failed: Callable[[bool], bool] | None = None):
        self.root = Path(run_dir) / "checkpoints"
        self.rank, self.world_size, self.is_main = rank, world_size, is_main
        self.barrier = barrier
        self.any_failed = any_failed
        self.keep = max(2, keep)

    def save(self, step: int, *, shared: dict[str, Any], per_rank: dict[str, Any],
             collective: Callable[[Path], None] | None = None) -> Path:
        """Write one checkpoint. `shared` is written by the main process, `per_rank` by every one.

        Keys are file names; a value is written by its suffix: `.safetensors` (dict of tensors),
        `.json` (JSON data), `.pt` (tensors and plain values, for `weights_only` loading).
        `collective(staging_dir)` runs on every process (e.g. a DeepSpeed engine's sharded save).
        A network's weights holding a non-finite value are refused (UserError) before anything is written.
        """
        for name in WEIGHT_FILES:
            if name in shared and (bad := first_non_finite(shared[name])) is not None:
                raise UserError(f"refusing to write checkpoint step {step}: tensor '{bad}' of {name} is not finite")
        final = self.root / checkpoint_name(step)
        staging = self.root / f"{checkpoint_name(step)}.tmp"

        def prepare() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            if staging.exists():
                shutil.rmtree(staging)  # left by a crash mid-save
            staging.mkdir()

        def write() -> None:
            if collective is not None:
                collective(staging)
            if self.is_main:
                for name, value in shared.items():
                    _write_by_suffix(staging / name, value)
            rank_dir = staging / f"rank-{self.rank}"
            rank_dir.mkdir(exist_ok=True)
            for name, value in per_rank.items():
                _write_by_suffix(rank_dir / name, value)

        def publish() -> None:
            files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
            write_json(staging / MANIFEST, {"step": step, "world_size": self.world_size, "files": files,
                                            "bytes": {f: (staging / f).stat().st_size for f in files},
                                            "sha256": {f: file_digest(staging / f) for f in files}})
            if final.exists():  # the same step saved again (e.g. a rerun that did no new steps)
                shutil.rmtree(final)
            os.replace(staging, final)
            self._prune()

        self._phase(step, staging, prepare if self.is_main else None)
        self._phase(step, staging, write)
        self._phase(step, staging, publish if self.is_main else None)
        return final

    def _phase(self, step: int, staging: Path, work: Callable[[], None] | None) -> None:
        """Run `work` (None: nothing on this process), then agree with the other processes on whether all
        succeeded. On a failure anywhere the staging folder is removed and every process raises."""
        error = None
        if work is not None:
            try:
                work()
            except Exception as err:  # noqa: BLE001 (re-raised below, after the other processes know)
                error = err
        failed = self.any_failed(error is not None) if self.any_failed else (self.barrier(), error is not None)[1]
        if not failed:
            return
        if self.is_main:
            shutil.rmtree(staging, ignore_errors=True)  # frees the space; complete checkpoints are untouched
        if error is not None:
            raise error
        raise UserError(f"checkpoint step {step} was not written: another process failed writing it")

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


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating tensor holding a NaN or an infinity, or None."""
    for name, tensor in tensors.items():
        if torch.is_floating_point(tensor) and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Remove what interrupted writes left in a run directory: `checkpoints/step-NNNNNNN.tmp/` folders of any
    step and `.NAME.tmp-PID.SUFFIX` files (`models/files.py`). Only the run's owner may call this (another
    training writing there would lose its files). Returns what was removed."""
    removed = []
    root = Path(run_dir)
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        if here == root / "checkpoints" / CORRUPT_DIR:
            dirs[:] = []  # kept for the user to inspect, as it was
            continue
        for name in list(dirs):
            if here == root / "checkpoints" and STAGING.match(name):
                shutil.rmtree(here / name, ignore_errors=True)
                removed.append(here / name)
                dirs.remove(name)
        for name in files:
            if name.startswith(".") and TMP_MARK in name:
                (here / name).unlink(missing_ok=True)
                removed.append(here / name)
    return removed


# ----------------------------------------------------------------------------------------------
# Reading, verifying, falling back.


class Checkpoint:
    """Read access to one complete checkpoint directory (its manifest checked against the folder)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not (self.path / MANIFEST).is_file():
            raise UserError(f"'{self.path}' is not a complete checkpoint (no {MANIFEST})")
        manifest = read_json(self.path / MANIFEST)
        problem = _manifest_problem(manifest, self.path)
        if problem:
            raise CorruptCheckpoint(f"checkpoint '{self.path}': {MANIFEST} {problem}", "bad-manifest")
        self.manifest = manifest
        self.step = manifest["step"]
        self.world_size = manifest["world_size"]

    @property
    def digests(self) -> dict[str, str]:
        """SHA-256 of every file (empty for checkpoints written before digests were recorded)."""
        return dict(self.manifest.get("sha256") or {})

    def has(self, name: str) -> bool:
        """True if the checkpoint holds the file `name`."""
        return (self.path / name).is_file()

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors of the safetensors file `name`."""
        return read_tensors(self.path / name)

    def json(self, name: str) -> Any:
        """The parsed JSON file `name`."""
        return read_json(self.path / name)

    def torch(self, name: str) -> Any:
        """The torch file `name`, loaded with weights_only."""
        return read_torch(self.path / name)

    def rank_file(self, rank: int, name: str) -> Path:
        """Path of the per-rank file `name` of process `rank`."""
        return self.path / f"rank-{rank}" / name

    def state(self) -> dict:
        """state.json, checked to be a mapping of this checkpoint's step."""
        state = self.json("state.json")
        if not isinstance(state, dict) or state.get("step") != self.step:
            raise CorruptCheckpoint(f"checkpoint '{self.path}': state.json is not the state of step {self.step}",
                                    "bad-state")
        return state

    def load_into(self, module: torch.nn.Module, name: str) -> None:
        """Load the tensors of `name` into `module` (same names and shapes), or a one-line UserError."""
        load_state(module, self.tensors(name), self.path / name)


def load_state(target, state: Any, where: Path | str) -> None:
    """`target.load_state_dict(state)` (a network, an optimizer, a detector, a buffer), or a one-line UserError
    naming `where` when the state does not fit this run."""
    try:
        target.load_state_dict(state)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UserError(f"'{where}' does not fit this run ({type(err).__name__}: {one_line(first, 240)})") from None


def _manifest_problem(manifest: Any, path: Path) -> str | None:
    """What is wrong with a manifest read from checkpoint folder `path`, or None."""
    if not isinstance(manifest, dict):
        return "is not a mapping"
    match = STEP_DIR.match(path.name) or re.match(r"^step-(\d{7})", path.name)
    step, world, files = manifest.get("step"), manifest.get("world_size"), manifest.get("files")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return f"has no valid step ({str(step)[:40]!r})"
    if match and int(match.group(1)) != step:
        return f"says step {step}, but the folder is {path.name}"
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        return f"has no valid world_size ({str(world)[:40]!r})"
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return "has no valid file list"
    for name in files:
        if name.startswith("/") or ".." in Path(name).parts:
            return f"lists a file outside the checkpoint ({name[:80]!r})"
    for key, kind in (("sha256", str), ("bytes", int)):
        table = manifest.get(key)
        if table is not None and (not isinstance(table, dict) or set(table) != set(files)
                                  or not all(isinstance(v, kind) for v in table.values())):
            return f"has a {key} table that does not match its file list"
    return None


def verify_checkpoint(path: Path) -> Checkpoint:
    """A `Checkpoint`, once verified: its manifest fits the folder, every listed file is there with its recorded
    size and SHA-256 (checkpoints written before digests existed: the files parse), state.json is the state of
    its step, and the networks' weights are finite. Raises `CorruptCheckpoint` with a one-line reason."""
    try:
        checkpoint = Checkpoint(path)
    except CorruptCheckpoint:
        raise
    except UserError as err:
        raise CorruptCheckpoint(str(err), "bad-manifest") from None
    sizes, digests = checkpoint.manifest.get("bytes") or {}, checkpoint.digests
    for name in checkpoint.manifest["files"]:
        file = checkpoint.path / name
        if not file.is_file() or file.is_symlink():
            raise CorruptCheckpoint(f"checkpoint '{checkpoint.path}': {name} is missing", "missing-file")
        if name in sizes and file.stat().st_size != sizes[name]:
            raise CorruptCheckpoint(f"checkpoint '{checkpoint.path}': {name} has {file.stat().st_size} bytes, "
                                    f"the manifest records {sizes[name]} (truncated or overwritten)", "wrong-size")
        if name in digests and file_digest(file) != digests[name]:
            raise CorruptCheckpoint(f"checkpoint '{checkpoint.path}': {name} does not match its SHA-256 in the "
                                    f"manifest", "wrong-digest")
        if not digests:  # an old checkpoint: no digests to compare, so at least every file must parse
            _parse(checkpoint, name)
    try:
        checkpoint.state()
    except UserError as err:
        raise CorruptCheckpoint(str(err), "bad-state") from None
    for name in WEIGHT_FILES:
        if checkpoint.has(name) and (bad := _non_finite_in_file(checkpoint.path / name)) is not None:
            raise CorruptCheckpoint(f"checkpoint '{checkpoint.path}': tensor '{bad}' of {name} is not finite",
                                    "non-finite")
    return checkpoint


def verify_file(checkpoint: Checkpoint, name: str) -> str:
    """Verify one file of a checkpoint against its manifest (size and SHA-256; an old checkpoint without digests:
    it parses) and return its SHA-256. For reading one network out of another run's checkpoint."""
    file = checkpoint.path / name
    if name not in checkpoint.manifest["files"] or not file.is_file():
        raise CorruptCheckpoint(f"checkpoint '{checkpoint.path}' has no {name}", "missing-file")
    sizes = checkpoint.manifest.get("bytes") or {}
    if name in sizes and file.stat().st_size != sizes[name]:
        raise CorruptCheckpoint(f"checkpoint '{checkpoint.path}': {name} has {file.stat().st_size} bytes, the "
                                f"manifest records {sizes[name]} (truncated or overwritten)", "wrong-size")
    digest = file_digest(file)
    if checkpoint.digests.get(name, digest) != digest:
        raise CorruptCheckpoint(f"checkpoint '{checkpoint.path}': {name} does not match its SHA-256 in the "
                                f"manifest", "wrong-digest")
    if not checkpoint.digests:
        _parse(checkpoint, name)
    return digest


def _parse(checkpoint: Checkpoint, name: str) -> None:
    try:
        if name.endswith(".json"):
            checkpoint.json(name)
        elif name.endswith(".pt"):
            checkpoint.torch(name)
        elif name.endswith(".safetensors"):
            with safe_open(str(checkpoint.path / name), framework="pt") as handle:
                handle.keys()
    except UserError as err:
        raise CorruptCheckpoint(str(err), "unreadable") from None
    except Exception as err:  # safetensors' own error types for a bad header
        raise CorruptCheckpoint(f"checkpoint file '{checkpoint.path / name}' cannot be read: "
                                f"{one_line(str(err), 200)}", "unreadable") from None


def _non_finite_in_file(path: Path) -> str | None:
    """The first tensor of a safetensors file holding a NaN or an infinity (read one tensor at a time)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                if torch.is_floating_point(tensor) and not bool(torch.isfinite(tensor).all()):
                    return key
    except Exception as err:  # a header the digest check did not cover (an old checkpoint)
        raise CorruptCheckpoint(f"checkpoint file '{path}' is not a valid safetensors file: "
                                f"{one_line(str(err), 200)}", "unreadable") from None
    return None


def move_aside(path: Path, reason: str) -> Path:
    """Move a checkpoint that failed verification to `checkpoints/corrupt/<name>-<reason>` (never deleted)."""
    slug = re.sub(r"[^a-z0-9]+", "-", reason.lower()).strip("-")[:30] or "corrupt"
    folder = Path(path).parent / CORRUPT_DIR
    folder.mkdir(exist_ok=True)
    target, n = folder / f"{Path(path).name}-{slug}", 1
    while target.exists():
        n += 1
        target = folder / f"{Path(path).name}-{slug}-{n}"
    os.replace(path, target)
    return target


def select_resume_checkpoint(run_dir: Path, log: Callable[[str], None]) -> Path | None:
    """The newest checkpoint of a run that verifies; the ones that fail are reported in one line each and
    moved aside. None when the run has none. The run's owner (main process) calls this.

    When checkpoints exist (or were moved aside earlier) but none verifies, resuming would silently start over:
    that is a UserError naming where they went."""
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
            return path
        except CorruptCheckpoint as err:
            moved = move_aside(path, err.kind)
            log(f"checkpoint {path.name} failed verification ({str(err).split(': ', 1)[-1]}); moved to {moved}")
    corrupt = Path(run_dir) / "checkpoints" / CORRUPT_DIR
    if corrupt.is_dir() and any(corrupt.iterdir()):
        raise UserError(f"no checkpoint of run '{run_dir}' verifies (those that failed are in {corrupt}); "
                        f"to start this run over, move that folder away")
    return None


# ----------------------------------------------------------------------------------------------
# What both loops do around their own files: DeepSpeed shards, and the per-process state.


def deepspeed_save(engine) -> Callable[[Path], None]:
    """The collective part of a checkpoint under DeepSpeed: the engine's own sharded state, in `deepspeed/`."""
    return lambda staging: engine.save_checkpoint(str(staging / "deepspeed"), tag="state")


def is_imported(checkpoint: Checkpoint) -> bool:
    """Whether the checkpoint came from `scripts/import_official.py` (it then holds no per-process state)."""
    return "imported" in checkpoint.state()


def check_resumable(checkpoint: Checkpoint, launch, kind: str | None = None) -> None:
    """Refuse a checkpoint this launch cannot resume: one of another kind of run (`kind`: nvae, vaebm), another
    number of processes (its data positions, RNG streams and replay buffers are per process), or another
    launcher (DeepSpeed or not). An imported checkpoint resumes on any number of processes."""
    written_by = checkpoint.state().get("kind")
    if kind is not None and written_by not in (None, kind):
        raise CorruptCheckpoint(f"checkpoint '{checkpoint.path}' holds a {str(written_by)[:20]!r} run, not {kind}",
                                "bad-state")
    processes = launch.accelerator.num_processes
    if checkpoint.world_size != processes and not is_imported(checkpoint):
        raise UserError(f"checkpoint '{checkpoint.path}' was written by {checkpoint.world_size} process(es); "
                        f"this launch has {processes}")
    was_deepspeed = bool(checkpoint.state().get("deepspeed", False))
    if was_deepspeed != launch.deepspeed:
        raise UserError(f"checkpoint '{checkpoint.path}' was written {'with' if was_deepspeed else 'without'} "
                        f"DeepSpeed; resume it the same way (or start a new run from its weights)")


def restore_process_state(checkpoint: Checkpoint, rank: int, stream, fresh_seed: int) -> None:
    """This process's data-stream position and RNG streams. An imported checkpoint has neither: the stream
    starts fresh and the process is seeded with `fresh_seed`, as a new run would be."""
    if is_imported(checkpoint):
        seed_everything(fresh_seed)
        return
    data, rng = checkpoint.json(f"rank-{rank}/data.json"), checkpoint.torch(f"rank-{rank}/rng.pt")
    try:
        stream.load_state_dict(data)
        set_rng_state(rng)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as err:
        raise CorruptCheckpoint(f"checkpoint '{checkpoint.path}': rank-{rank}/data.json or rng.pt holds no valid "
                                f"state ({type(err).__name__})", "bad-state") from None
