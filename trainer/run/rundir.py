"""Run directories: `config.yaml`, `log.txt`, `stats.jsonl`, `tb/`, `samples/`, `checkpoints/`.

A run directory belongs to one network: re-running a command against it resumes, and a config whose
network section differs from the run's is refused (its checkpoints would not load). A diverged run
holds `DIVERGED.json` and is never resumed into; `--resume-from CHECKPOINT` with changed settings
rolls it back to a checkpoint written before the divergence began.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import yaml

from trainer.config.loader import from_dict, save_config, to_dict
from trainer.errors import UserError
from trainer.run.checkpoint import list_checkpoints, write_json

DIVERGED_MARKER = "DIVERGED.json"
# Switches that change how a network runs, not its weights: a resumed run may change them.
RUNTIME_KEYS = {"gradient_checkpointing", "channels_last"}


def check_run_dir(run_dir: Path, cfg, *, section: str = "model", resume_from: Path | None = None) -> Path:
    """Refuse a run directory this config may not use (another network, a diverged run); writes nothing.

    The trainers call it first, then load what can still fail (data, VAE, models), and only then
    `prepare_run_dir`, so a start that fails leaves no run directory behind and a corrected retry works.
    `section` names the config section that fixes the network's shapes (model, energy).
    """
    run_dir = Path(run_dir).expanduser()
    config_path = run_dir / "config.yaml"
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run directory '{run_dir}' exists and is not a directory")
    previous = _normalized(config_path, type(cfg)) if config_path.is_file() else None
    current = to_dict(cfg)
    if previous is not None and _network(previous, section) != _network(current, section):
        changed = _first_difference(_network(previous, section), _network(current, section), section)
        raise UserError(f"run directory '{run_dir}' holds a run with a different network ({changed}); use a new --run-dir")
    marker = run_dir / DIVERGED_MARKER
    if marker.is_file():
        info = json.loads(marker.read_text())
        if resume_from is None:
            raise UserError(f"run '{run_dir}' diverged at step {info['step']} ({info['metric']} = {float(info['value']):.4g}); "
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
    """Create (or reopen) a run directory and write the resolved config. The main process writes.

    Checks first (`check_run_dir`); `section` names the config section that fixes the network's shapes.
    """
    run_dir = check_run_dir(run_dir, cfg, section=section, resume_from=resume_from)
    config_path, marker = run_dir / "config.yaml", run_dir / DIVERGED_MARKER
    if accelerator.is_main_process:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            if resume_from is not None:  # roll back: later checkpoints and the marker belong to the old path
                for step, path in list_checkpoints(run_dir):
                    if path.resolve() != Path(resume_from).resolve() and step > _step_of(Path(resume_from)):
                        shutil.rmtree(path)
                marker.unlink(missing_ok=True)
            save_config(cfg, config_path)
        except OSError as err:
            raise UserError(f"cannot write to run directory '{run_dir}': {err.strerror}") from None
    accelerator.wait_for_everyone()
    return run_dir


STOP_FILE = "STOP"


def stop_requested(run_dir: Path, accelerator) -> bool:
    """True on every process once `RUN/STOP` exists (a preemption handler or a user created it).

    The check is collective, so all processes stop at the same step; the main process then removes
    the file, so the re-run (e.g. a requeued job) carries on.
    """
    from trainer.run.collective import any_rank

    requested = any_rank(accelerator, (Path(run_dir) / STOP_FILE).exists())
    if requested and accelerator.is_main_process:
        (Path(run_dir) / STOP_FILE).unlink(missing_ok=True)
    return requested


def mark_diverged(run_dir: Path, divergence) -> None:
    """Record a divergence and drop checkpoints from its onset on."""
    for step, path in list_checkpoints(run_dir):
        if step >= divergence.onset:
            shutil.rmtree(path, ignore_errors=True)
    value = divergence.value if math.isfinite(divergence.value) else str(divergence.value)  # strict JSON: "nan"
    write_json(Path(run_dir) / DIVERGED_MARKER, {"step": divergence.step, "onset": divergence.onset,
                                                  "metric": divergence.metric, "value": value})


def _check_resume_point(run_dir: Path, checkpoint: Path) -> None:
    known = {path.resolve() for _, path in list_checkpoints(run_dir)}
    if checkpoint.resolve() not in known:
        raise UserError(f"--resume-from '{checkpoint}' is not a complete checkpoint of run '{run_dir}'")


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])


def _normalized(config_path: Path, cls) -> dict:
    """A run's saved config with today's defaults filled in (fields added since it was written)."""
    raw = yaml.safe_load(config_path.read_text()) or {}
    try:
        return to_dict(from_dict(cls, raw))
    except UserError:
        return raw


def _network(config: dict, section: str) -> dict:
    return {k: v for k, v in (config.get(section) or {}).items() if k not in RUNTIME_KEYS}


def _first_difference(old: dict, new: dict, prefix: str) -> str:
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"{prefix}.{key}: {old.get(key)!r} -> {new.get(key)!r}"
    return prefix
