"""Run directories: `config.yaml`, `log.txt`, `stats.jsonl`, `tb/`, `samples/`, `checkpoints/`, `lock.json`,
`status.json`.

A run directory belongs to one training (all its processes) for the training's whole life: `own_run_dir` takes
its lock (`trainer/run/lock.py`) before anything is written, removes what interrupted writes left, checks it,
listens for stop signals (`trainer/run/signals.py`) and, at the end, records how the run ended in `status.json`
and gives the lock back. It belongs to one network too: re-running a command against it resumes, and a config
whose network section differs from the run's is refused (its checkpoints would not load). A diverged run holds
`DIVERGED.json` and is never resumed into; `--resume-from CHECKPOINT` with changed settings rolls it back to a
checkpoint written before the divergence began.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import yaml

from trainer.config.loader import from_dict, save_config, to_dict
from trainer.errors import EXIT_BAD_INPUT, EXIT_DIVERGED, TrainingDiverged, UserError, no_space_path, one_line
from trainer.errors import write_launcher_note
from trainer.run.checkpoint import (CorruptCheckpoint, list_checkpoints, remove_stale_temporaries, verify_checkpoint,
                                    write_json)
from trainer.run.collective import any_ranks, main_then_share
from trainer.run.lock import LOCK_FILE, RunLock
from trainer.run.signals import StopSignals

DIVERGED_MARKER = "DIVERGED.json"
STATUS_FILE = "status.json"
STOP_FILE = "STOP"
# Switches that change how a network runs, not its weights: a resumed run may change them.
RUNTIME_KEYS = {"gradient_checkpointing", "channels_last"}


class OwnedRun:
    """A run directory while a training owns it: its path, the lock (main process), the stop signals."""

    def __init__(self, path: Path, lock: RunLock | None, signals: StopSignals, accelerator, prepare_args: dict):
        self.path, self.lock, self.signals, self.accelerator = path, lock, signals, accelerator
        self.ending: tuple[str, int, str] | None = None  # (state, step, line) the loop reports at its end
        self.started = False  # prepared and training: only then does status.json describe this start
        self._prepare_args = prepare_args

    def prepare(self, cfg) -> None:
        """Write the resolved config (`prepare_run_dir`): the loop calls this once everything that can still fail
        at a start (data, the VAE, the models) has loaded, so a start that fails leaves nothing behind."""
        prepare_run_dir(self.path, cfg, self.accelerator, **self._prepare_args)
        self.started = True

    def stop_reason(self) -> str | None:
        """Why the training should stop after this step, decided collectively (every process gets the same
        answer): "<RUN>/STOP" (the file exists), a signal's name (SIGTERM, SIGINT, SIGUSR1 on any process), or
        None. The main process removes the STOP file, so a re-run (a requeued job) carries on."""
        stop_file = self.path / STOP_FILE
        lost = self.lock is not None and self.lock.lost is not None
        flags = [stop_file.exists(), self.signals.received is not None, lost]
        by_file, by_signal, by_loss = any_ranks(self.accelerator, flags)
        if by_loss:
            who = self.lock.lost if lost else "another start"
            raise UserError(f"the run directory '{self.path}' was taken over by {who} (this training's lock went "
                            f"stale); stopped without writing a checkpoint")
        if by_file:
            if self.accelerator.is_main_process:
                stop_file.unlink(missing_ok=True)
            return str(stop_file)
        if by_signal:
            return self.signals.received or "a stop signal to another process"
        return None

    def end(self, state: str, step: int, line: str) -> None:
        """What the loop says at its end (finished, halted or stopped at `step`), for status.json; a run stopped by
        a signal also leaves its line for the launcher (`trainer/run/launcher_exit.py`: exit 0, not a traceback)."""
        self.ending = (state, step, line)
        if state == "stopped" and self.signals.received is not None:
            write_launcher_note(0, line)

    def close(self, error: BaseException | None) -> None:
        """Record how the run ended (status.json; not for a start refused by its checks), give the signals and
        the lock back."""
        self.signals.restore()
        if self.lock is None:
            return
        if self.started:
            try:
                write_json(self.path / STATUS_FILE, _status(self.ending, error))
            except OSError:
                pass  # a full device: the exit code and the line still say what happened
        self.lock.release()


def _status(ending: tuple[str, int, str] | None, error: BaseException | None) -> dict:
    """status.json: how the run ended, with the exit code the script exits with (README, "Exit codes")."""
    if error is None:
        state, step, line = ending or ("finished", None, "")
        code = 0
    elif isinstance(error, TrainingDiverged):
        state, step, line, code = "diverged", None, one_line(str(error)), EXIT_DIVERGED
    elif isinstance(error, UserError) or (isinstance(error, OSError) and no_space_path(error) is not None):
        state, step, line, code = "failed", None, one_line(str(error)), EXIT_BAD_INPUT
    else:
        state, step, line, code = "crashed", None, one_line(f"{type(error).__name__}: {error}"), 1
    return {"state": state, "exit_code": code, "step": step, "message": line, "host": socket.gethostname(),
            "pid": os.getpid(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", "0")}


@contextmanager
def own_run_dir(run_dir: Path, cfg, accelerator, *, kind: str, section: str = "model",
                resume_from: Path | None = None, stale_after: float | None = None) -> Iterator[OwnedRun]:
    """Own a run directory for the body of the `with`: lock it (the main process; every process learns the
    outcome), remove stale temporaries, check it against this start (`check_run_dir`), catch stop signals. The
    body calls `run.prepare(cfg)` once what can still fail has loaded; a start that fails before that removes
    the directory it created (nothing of a refused or failed start stays behind)."""
    run_dir = Path(run_dir).expanduser()
    stale_after = stale_after if stale_after is not None else cfg.train.lock_stale_after
    check_run_dir(run_dir, cfg, section=section, resume_from=resume_from)  # refusals before anything is written

    taken: dict[str, RunLock] = {}

    def take() -> bool:
        """Main process: create the directory if needed and lock it; whether this start created it."""
        if run_dir.exists() and not run_dir.is_dir():
            raise UserError(f"run directory '{run_dir}' exists and is not a directory")
        created = not run_dir.exists()
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create run directory '{run_dir}': {err.strerror}") from None
        taken["lock"] = RunLock.acquire(run_dir, stale_after)  # refused: the holder's, however new, stays as is
        remove_stale_temporaries(run_dir)  # ours now: nobody else is writing here
        return created

    created = main_then_share(accelerator, take) and accelerator.is_main_process
    lock = taken.get("lock")
    run = OwnedRun(run_dir, lock, StopSignals(on_exit=lock.release if lock else lambda: None).install(), accelerator,
                   {"kind": kind, "section": section, "resume_from": resume_from})
    error: BaseException | None = None
    try:
        yield run
    except BaseException as err:
        error = err
        if created and not run.started:  # nothing of the failed start stays behind (emptied while still locked)
            for path in run_dir.iterdir():
                if path.name != LOCK_FILE:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
            run.signals.restore()
            lock.release()
            run.lock = None
            try:
                run_dir.rmdir()
            except OSError:
                pass  # another start took it meanwhile
        raise
    finally:
        run.close(error)


def check_run_dir(run_dir: Path, cfg, *, section: str = "model", resume_from: Path | None = None) -> Path:
    """Refuse a run directory this config may not use (another network, a diverged run, a rollback point that is
    not one of its checkpoints); reads only. `section` names the config section that fixes the network's shapes
    (model, energy)."""
    run_dir = Path(run_dir).expanduser()
    config_path = run_dir / "config.yaml"
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run directory '{run_dir}' exists and is not a directory")
    previous = _normalized(config_path, type(cfg)) if config_path.is_file() else None
    current = to_dict(cfg)
    if previous is not None and _network(previous, section) != _network(current, section):
        changed = _first_difference(_network(previous, section), _network(current, section), section)
        raise UserError(f"run directory '{run_dir}' holds a run with a different network ({changed}); "
                        f"use a new --run-dir")
    if (run_dir / DIVERGED_MARKER).is_file():
        info = read_divergence(run_dir)
        if resume_from is None:
            raise UserError(f"run '{run_dir}' diverged at step {info['step']} ({info['metric']} = {info['value']}); "
                            f"not resuming into it. Resume from an earlier checkpoint with changed settings: "
                            f"--resume-from {run_dir}/checkpoints/step-NNNNNNN key=value ...")
        if previous == current:
            raise UserError(f"run '{run_dir}' diverged with these exact settings; change something "
                            f"(e.g. optim.lr, langevin.step_size) to resume from '{resume_from}'")
    if resume_from is not None:
        _check_resume_point(run_dir, Path(resume_from))
    return run_dir


def prepare_run_dir(run_dir: Path, cfg, accelerator, *, kind: str, section: str = "model",
                    resume_from: Path | None = None) -> Path:
    """Check a (new or existing) run directory against this start (`check_run_dir`) and write the resolved
    config. The main process writes; every process raises the same `UserError`. Call it while owning the
    directory (`own_run_dir`, through `OwnedRun.prepare`)."""
    run_dir = check_run_dir(run_dir, cfg, section=section, resume_from=resume_from)
    config_path, marker = run_dir / "config.yaml", run_dir / DIVERGED_MARKER

    def write() -> None:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            if resume_from is not None:  # verified before anything is rolled back
                try:
                    verify_checkpoint(Path(resume_from))
                except CorruptCheckpoint as err:
                    raise UserError(f"--resume-from: {err}") from None
                # Roll back: later checkpoints and the marker belong to the old path.
                for step, path in list_checkpoints(run_dir):
                    if path.resolve() != Path(resume_from).resolve() and step > _step_of(Path(resume_from)):
                        shutil.rmtree(path)
                marker.unlink(missing_ok=True)
            save_config(cfg, config_path)
        except OSError as err:
            if no_space_path(err) is not None:
                raise
            raise UserError(f"cannot write to run directory '{run_dir}': {err.strerror}") from None

    main_then_share(accelerator, write)
    return run_dir


def mark_diverged(run_dir: Path, divergence) -> None:
    """Record a divergence and drop checkpoints from its onset on."""
    for step, path in list_checkpoints(run_dir):
        if step >= divergence.onset:
            shutil.rmtree(path, ignore_errors=True)
    value = divergence.value if math.isfinite(divergence.value) else str(divergence.value)  # strict JSON: "nan"
    write_json(Path(run_dir) / DIVERGED_MARKER, {"step": divergence.step, "onset": divergence.onset,
                                                  "metric": divergence.metric, "value": value})


def read_divergence(run_dir: Path) -> dict:
    """DIVERGED.json of a run, with its fields as short strings (a garbled file still blocks a blind resume)."""
    try:
        info = json.loads((Path(run_dir) / DIVERGED_MARKER).read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        info = {}
    info = info if isinstance(info, dict) else {}
    value = info.get("value", "?")
    value = f"{value:.4g}" if isinstance(value, float) else str(value)[:40]
    return {"step": str(info.get("step", "?"))[:20], "metric": str(info.get("metric", "?"))[:60], "value": value}


def _check_resume_point(run_dir: Path, checkpoint: Path) -> None:
    known = {path.resolve() for _, path in list_checkpoints(run_dir)}
    if checkpoint.resolve() not in known:
        raise UserError(f"--resume-from '{checkpoint}' is not a complete checkpoint of run '{run_dir}'")


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])


def _normalized(config_path: Path, cls) -> dict:
    """A run's saved config with today's defaults filled in (fields added since it was written)."""
    try:
        raw = yaml.safe_load(config_path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        raise UserError(f"'{config_path}' is not a readable config; this run directory is damaged") from None
    if not isinstance(raw, dict):
        raise UserError(f"'{config_path}' does not hold a mapping; this run directory is damaged")
    try:
        return to_dict(from_dict(cls, raw))
    except UserError:
        return raw


def _network(config: dict, section: str) -> dict:
    network = config.get(section)
    return {k: v for k, v in (network if isinstance(network, dict) else {}).items() if k not in RUNTIME_KEYS}


def _first_difference(old: dict, new: dict, prefix: str) -> str:
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"{prefix}.{key}: {str(old.get(key))[:40]!r} -> {str(new.get(key))[:40]!r}"
    return prefix
