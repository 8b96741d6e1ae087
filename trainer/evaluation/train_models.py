"""Train the models an evaluation experiment needs, with the project's own trainers, and sample them.

    nvae_run = train_nvae_run("digits16", ["train.max_steps=600"], models_dir)
    vaebm_run = train_vaebm_run("digits16", nvae_run, ["train.max_steps=150"], models_dir)
    sampler = sampler_for(vaebm_run)                  # a models.sampler.BundleSampler (VAE + energy)
    vae_images = sampler.sample(1000, steps=0, seed=0)   # the NVAE alone, uint8 [1000, 3, H, W]
    vaebm_images = sampler.sample(1000, seed=0)          # the same chains after Langevin

Configs are built exactly as `scripts/train_nvae.py` / `scripts/train_vaebm.py` build them (preset
name or YAML path + dotted overrides, validated), and trained by `trainer.nvae.loop.train_nvae` /
`trainer.ebm.loop.train_vaebm`. A run lives in `models_dir/<kind>-<preset>-<hash>`, the hash taken
over the resolved config (for VAEBM it includes the VAE run's path, itself hashed): asking again for
the same model finds the finished run, which the trainer resumes and stops at once, so experiments
given the same models folder share their trainings, and any changed setting trains a new run. A training
stopped on request (Ctrl-C, SIGTERM, a STOP file) ends the experiment (`TrainingStopped`, exit 4), so that no
result is ever computed from a half-trained model; running the same command again resumes it.
Bundles are exported once into `RUN/bundle-<BN settings>` (`trainer.export.export_run`) and loaded with
`models.load_bundle`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

from trainer.config.loader import load_config, to_dict
from trainer.errors import TrainingDiverged, TrainingStopped, UserError

Log = Callable[[str], None]
# What changes how a run reports, not what it trains, is left out of the run's hash: these keys, and
# whole sections (in-training FID), so that a run stays found when such options are added or changed.
_NOT_HASHED = {("train", "progress_bar"), ("train", "log_every"), ("train", "image_every"), ("data", "num_workers"),
               ("data", "cache_dir")}
_NOT_HASHED_SECTIONS = {"eval"}
# Always applied: no progress bars inside an experiment's output.
_QUIET = ["train.progress_bar=false"]


def _run_dir(kind: str, preset: str, cfg, models_dir: Path, extra: dict | None = None) -> Path:
    """models_dir/<kind>-<preset stem>-<10 hex digits of the resolved config (and `extra`)>.

    Only values that differ from the config classes' defaults are hashed, so a key added to the config tree
    later (with a default that keeps the old behaviour) does not make finished runs unfindable."""
    defaults = to_dict(type(cfg)())
    tree = {}
    for name, section in to_dict(cfg).items():
        if name in _NOT_HASHED_SECTIONS:
            continue
        if not isinstance(section, dict):
            tree[name] = section
            continue
        base = defaults.get(name) if isinstance(defaults.get(name), dict) else {}
        tree[name] = {key: value for key, value in section.items() if key not in base or base[key] != value}
    for section, key in _NOT_HASHED:
        tree.get(section, {}).pop(key, None)
    tree.update(extra or {})
    digest = hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:10]
    return Path(models_dir) / f"{kind}-{Path(preset).stem}-{digest}"


def nvae_config(preset: str, overrides: Sequence[str] = ()):
    """The validated NVAETrainingConfig of a preset (name or YAML path) plus dotted overrides."""
    from trainer.config.nvae import NVAETrainingConfig, architecture_dict

    return load_config(NVAETrainingConfig, "nvae", preset, [*_QUIET, *overrides], expand={"model": architecture_dict})


def vaebm_config(preset: str, vae_run: Path, overrides: Sequence[str] = ()):
    """The validated VAEBMTrainingConfig of a preset plus overrides, on the NVAE run `vae_run`."""
    from trainer.config.ebm import VAEBMTrainingConfig

    return load_config(VAEBMTrainingConfig, "vaebm", preset, [*_QUIET, *overrides, f"vae.path={Path(vae_run).resolve()}"])


def train_nvae_run(preset: str, overrides: Sequence[str], models_dir: Path, log: Log = print) -> Path:
    """Train (or find finished) the NVAE of `preset` + `overrides` under `models_dir`; returns its run directory."""
    from trainer.nvae.loop import train_nvae

    cfg = nvae_config(preset, overrides)
    run_dir = _run_dir("nvae", preset, cfg, models_dir)
    log(f"NVAE {preset} ({cfg.train.max_steps} steps, batch {cfg.train.global_batch_size}) in {run_dir}")
    if not finished(run_dir, cfg.train.max_steps):
        _require_last_step(run_dir, train_nvae(cfg, run_dir), cfg.train.max_steps)
    return run_dir


def _require_last_step(run_dir: Path, checkpoint: Path | None, max_steps: int) -> None:
    """Raise `TrainingStopped` unless the checkpoint a training returned is its last step. The trainer returns
    normally when a stop signal or a STOP file ended it early (a checkpoint at the current step), and the signal
    handler is its own, so without this an experiment would go on to its next training and score this one."""
    from trainer.run.checkpoint import Checkpoint

    step = Checkpoint(checkpoint).step if checkpoint is not None else 0
    if step < max_steps:
        raise TrainingStopped(f"the training in {run_dir} stopped at step {step} of {max_steps}, before the "
                              f"experiment had its results (none were written); run the same command again to "
                              f"resume it")


def finished(run_dir: Path, max_steps: int) -> bool:
    """Whether the run's newest checkpoint is its last step and verifies. Such a run is read, not resumed: a
    resume would take the run's lock, so two experiments sharing a models folder could not both read it."""
    from trainer.run.checkpoint import list_checkpoints, verify_checkpoint

    checkpoints = list_checkpoints(run_dir) if Path(run_dir).is_dir() else []
    if not checkpoints or checkpoints[-1][0] != max_steps:
        return False
    try:
        verify_checkpoint(checkpoints[-1][1])
    except UserError:  # corrupt: the trainer's resume moves it aside and retrains from an earlier one
        return False
    return True


def train_vaebm_run(preset: str, vae_run: Path, overrides: Sequence[str], models_dir: Path, log: Log = print) -> Path:
    """Train (or find finished) a VAEBM energy on the NVAE run `vae_run`; returns its run directory.

    A run that diverges is an error (UserError naming the run): an experiment never reports numbers
    of a diverged energy. Its log says at which step and why; `divergence_hint` says what to change.
    """
    from trainer.ebm.loop import divergence_hint, train_vaebm
    from trainer.ebm.sources import resolve_vae_checkpoint

    cfg = vaebm_config(preset, vae_run, overrides)
    # The energy belongs to the VAE checkpoint it trains against, not only to the VAE run: if that run was
    # trained further since, its newest checkpoint is another VAE, and an energy of the older one is not reused.
    vae_checkpoint = resolve_vae_checkpoint(vae_run)[0]
    run_dir = _run_dir("vaebm", preset, cfg, models_dir, {"vae_checkpoint": vae_checkpoint.name})
    log(f"VAEBM {preset} ({cfg.train.max_steps} steps, {cfg.langevin.steps} Langevin steps) in {run_dir}")
    try:
        if not finished(run_dir, cfg.train.max_steps):
            _require_last_step(run_dir, train_vaebm(cfg, run_dir), cfg.train.max_steps)
    except TrainingDiverged:
        raise UserError(f"{cfg.method} training diverged (see {run_dir}/log.txt); {divergence_hint(cfg)}") from None
    return run_dir


def sampler_for(run_dir: Path, *, temperatures: Sequence[float] = (1.0,), bn_passes: int = 500,
                seed: int = 0, step: int | None = None, log: Log = print):
    """The `models.sampler.BundleSampler` of a finished NVAE or VAEBM run (exported into the run on first use).

    `step`: the run's checkpoint of that step instead of its newest. `temperatures`: where the NVAE's BN statistics
    are readjusted (VAE-only sampling at such a
    temperature uses them, as NVAE's own sampler does; Langevin always uses the statistics the energy trained
    with, which an energy trained on readjusted statistics also brings as its temperature's: README, "BN
    statistics of an energy").
    """
    import models
    from trainer.export import export_run

    from trainer.run.checkpoint import list_checkpoints

    if step is None:  # the newest, named by its step: a run trained further since gets a bundle of its own
        checkpoints = list_checkpoints(run_dir) if Path(run_dir).is_dir() else []
        if not checkpoints:
            raise UserError(f"run '{run_dir}' has no complete checkpoint")
        step = checkpoints[-1][0]
    at = f"-step{step}"
    bundle = Path(run_dir) / f"bundle-t{'_'.join(f'{t:g}' for t in temperatures) or 'none'}-bn{bn_passes}-s{seed}{at}"
    if not (bundle / "bundle.json").is_file():
        export_run(Path(run_dir), bundle, step=step, temperatures=tuple(temperatures), bn_passes=bn_passes, seed=seed,
                   log=log)
    return models.load_bundle(bundle, device="cpu")


def energy_gap_summary(run_dir: Path, tail: float = 0.2, points: int = 50) -> dict:
    """How an energy run's gap (mean E(negatives) − mean E(positives), stats.jsonl `energy_gap`) ended and whether it
    settled. Over the last `tail` of the logged steps: `energy_gap_tail_mean`, the least-squares slope per 100
    iterations `energy_gap_tail_slope`, and `energy_gap_settled` = 1.0 when the fitted change across that window is
    smaller than the spread (std) of the logged gaps around the fit, else 0.0; `energy_gap` is the last logged
    value and `energy_gap_curve` at most `points` [step, gap] pairs of the whole run."""
    import math

    import torch

    rows = [json.loads(line) for line in (Path(run_dir) / "stats.jsonl").read_text().splitlines() if line.strip()]
    rows = [row for row in rows if "energy_gap" in row]
    if not rows:
        return {"energy_gap": math.nan}
    steps = torch.tensor([float(row["step"]) for row in rows], dtype=torch.float64)
    gaps = torch.tensor([float(row["energy_gap"]) for row in rows], dtype=torch.float64)
    window = steps >= steps[-1] - tail * steps[-1]
    x, y = steps[window], gaps[window]
    result = {"energy_gap": float(gaps[-1]), "energy_gap_tail_mean": float(y.mean())}
    if len(x) >= 3:
        slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
        spread = float((y - y.mean() - slope * (x - x.mean())).std(unbiased=True))
        change = slope * float(x[-1] - x[0])
        result.update(energy_gap_tail_slope=100 * slope, energy_gap_settled=float(abs(change) < spread))
    every = max(1, math.ceil(len(rows) / points))
    result["energy_gap_curve"] = [[int(steps[i]), round(float(gaps[i]), 4)] for i in range(0, len(rows), every)]
    return result


def trained_bn_statistics(run_dir: Path) -> str:
    """Which BN statistics an energy run trained with, in words (its newest checkpoint's record)."""
    from trainer.ebm.sources import describe_bn
    from trainer.run.checkpoint import Checkpoint, latest_checkpoint

    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise UserError(f"run '{run_dir}' has no complete checkpoint")
    return describe_bn(Checkpoint(checkpoint).json("state.json").get("vae_bn", {"readjusted": False}))
