"""Export a training run (NVAE-only or VAEBM) to a self-contained inference bundle (`models/bundle.py`).

    export_run(Path("runs/vaebm"), Path("bundles/chq256"), temperatures=(0.6, 0.7, 0.8, 1.0))

Steps: find the checkpoint (newest, or `step`) → read the networks' configs and weights → for a VAEBM
run, load the VAE the run was configured with (`vae.path` of its resolved config; the checkpoint it
resolves to is recorded; an energy trained on readjusted BN statistics brings them from its checkpoint:
they become the bundle's original statistics and its cached ones for their temperature, `energy_statistics`)
→ readjust the NVAE's generative-path BN statistics at every other requested temperature
(`NVAE.temperature_statistics`, 500 passes of batch 16 by default, as the official NVAE sampler) → write the
bundle atomically.

Weights are read through `read_state_dict`, the one place that knows how a checkpoint stores a
network. Today every network is one `.safetensors` file; DeepSpeed ZeRO-sharded checkpoints will plug
in a consolidator (`register_consolidator`) that gathers the shards into one state dict.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from models.bundle import BundleError, save_bundle
from models.energy import build_energy
from models.registry import build_vae
from trainer.config.ebm import VAEBMTrainingConfig
from trainer.config.loader import from_dict, read_yaml
from trainer.config.nvae import NVAETrainingConfig
from trainer.ebm.sources import BN_FILE, resolve_vae_checkpoint
from trainer.errors import UserError
from trainer.run.checkpoint import Checkpoint, latest_checkpoint, list_checkpoints, verify_checkpoint, verify_file

DEFAULT_TEMPERATURES = (0.6, 0.7, 0.8, 1.0)
WEIGHT_FILES = {"ema": "ema.safetensors", "raw": "model.safetensors"}

# A consolidator: (checkpoint, file name of the network, e.g. "energy.safetensors") → a full state
# dict, or None when it does not recognize the layout. Tried in order; the plain reader comes last.
Consolidator = Callable[[Checkpoint, str], "dict[str, torch.Tensor] | None"]
_CONSOLIDATORS: list[Consolidator] = []


def register_consolidator(fn: Consolidator) -> Consolidator:
    """Add a reader for another checkpoint layout (e.g. DeepSpeed ZeRO shards); usable as a decorator."""
    _CONSOLIDATORS.append(fn)
    return fn


def read_state_dict(checkpoint: Checkpoint, name: str) -> dict[str, torch.Tensor]:
    """The full state dict of one network of a checkpoint, whatever layout the checkpoint uses."""
    for consolidate in _CONSOLIDATORS:
        state = consolidate(checkpoint, name)
        if state is not None:
            return state
    if not checkpoint.has(name):
        raise UserError(f"checkpoint '{checkpoint.path}' has no {name}")
    return checkpoint.tensors(name)


@dataclass
class RunSource:
    """What an export reads from a run: its kind, checkpoint and configs."""

    kind: str  # "nvae" or "vaebm"
    run_dir: Path
    checkpoint: Checkpoint
    vae_config: Any
    vae_checkpoint: Checkpoint
    vae_weights: str  # "ema" or "raw"
    energy_config: Any = None
    method: str = "vaebm"  # the energy method (models/adapters.py)
    sampling: dict | None = None
    vae_run: Path | None = None
    notes: tuple[str, ...] = ()


def _pick_checkpoint(run_dir: Path, step: int | None) -> Checkpoint:
    """The checkpoint to export, verified (`verify_checkpoint`): a bundle never launders a corrupt one."""
    if step is None:
        path = latest_checkpoint(run_dir)
        if path is None:
            raise UserError(f"run '{run_dir}' has no complete checkpoint")
        return verify_checkpoint(path)
    for found_step, path in list_checkpoints(run_dir):
        if found_step == step:
            return verify_checkpoint(path)
    steps = ", ".join(str(s) for s, _ in list_checkpoints(run_dir)) or "none"
    raise UserError(f"run '{run_dir}' has no complete checkpoint at step {step} (available: {steps})")


def read_run(run_dir: Path, step: int | None = None, weights: str | None = None) -> RunSource:
    """Inspect a run directory: NVAE (config has `model`) or VAEBM (config has `energy` and `vae`)."""
    run_dir = Path(run_dir).expanduser()
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise UserError(f"'{run_dir}' is not a run directory (no config.yaml)")
    raw = read_yaml(config_path)
    if weights not in (None, "ema", "raw"):
        raise UserError(f"weights must be 'ema' or 'raw', got '{weights}'")
    checkpoint = _pick_checkpoint(run_dir, step)
    if "model" in raw:
        vae_config = from_dict(NVAETrainingConfig, {"model": raw["model"]}).model
        return RunSource("nvae", run_dir, checkpoint, vae_config, checkpoint, weights or "ema",
                         sampling={"steps": 0, "step_size": None, "temperature": 1.0, "autocast": "no"})
    if "energy" not in raw or "vae" not in raw:
        raise UserError(f"'{config_path}' is neither an NVAE run (model section) nor a VAEBM run (energy and vae sections)")
    cfg = from_dict(VAEBMTrainingConfig, {k: raw[k] for k in ("method", "energy", "vae", "langevin") if k in raw})
    if cfg.vae.path is None:
        raise UserError(f"'{config_path}' has no vae.path")
    vae_checkpoint_dir, vae_config_path = resolve_vae_checkpoint(cfg.vae.path)
    vae_raw = read_yaml(vae_config_path)
    if "model" not in vae_raw:
        raise UserError(f"'{vae_config_path}' has no model section: not an NVAE run")
    vae_config = from_dict(NVAETrainingConfig, {"model": vae_raw["model"]}).model
    notes = []
    trained_against = (checkpoint.json("state.json") if checkpoint.has("state.json") else {}).get("vae_checkpoint")
    if trained_against and Path(trained_against).resolve() != vae_checkpoint_dir.resolve():
        notes.append(f"warning: the energy was trained against VAE checkpoint '{trained_against}', but vae.path "
                     f"'{cfg.vae.path}' now resolves to '{vae_checkpoint_dir}'; exporting the latter")
    if weights is not None and weights != cfg.vae.weights:
        notes.append(f"warning: the energy was trained on the {cfg.vae.weights} VAE weights; exporting the {weights} ones")
    sampling = {"steps": cfg.langevin.sample_steps, "step_size": cfg.langevin.step_size,
                "temperature": cfg.vae.temperature, "autocast": cfg.langevin.autocast,
                "metropolis": cfg.langevin.metropolis}
    return RunSource("vaebm", run_dir, checkpoint, vae_config, Checkpoint(vae_checkpoint_dir), weights or cfg.vae.weights,
                     energy_config=cfg.energy, method=cfg.method, sampling=sampling, vae_run=vae_config_path.parent,
                     notes=tuple(notes))


def _load(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"'{where}' does not match its config: {str(err).splitlines()[0]}") from None


def parse_temperatures(text: str) -> list[float]:
    """'0.6,0.7' → [0.6, 0.7]; UserError on anything else."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--temperatures must be comma-separated numbers, got '{text}'") from None
    if any(not t > 0 for t in values):
        raise UserError(f"temperatures must be > 0, got '{text}'")
    return sorted(set(values))


def pass_reporter(temperature: float, passes: int, log: Callable[[str], None]) -> Callable[[int], None]:
    """A `progress(done)` callback that logs every tenth of the passes, with the time taken and left."""
    start, every = time.monotonic(), max(1, passes // 10)

    def report(done: int) -> None:
        if done % every and done != passes:
            return
        elapsed = time.monotonic() - start
        left = f", about {format_seconds(elapsed / done * (passes - done))} left" if done < passes else ""
        log(f"  t={temperature:g}: {done}/{passes} passes, {format_seconds(elapsed)}{left}")

    return report


def format_seconds(seconds: float) -> str:
    """'42 s', '3 min 05 s', '1 h 02 min'."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def energy_statistics(source: RunSource, vae, log: Callable[[str], None]) -> dict | None:
    """The BN statistics an energy run trained with, put into `vae` (README, "BN statistics of an energy"): an energy
    trained on statistics readjusted at t (`vae.bn_temperature`) keeps them in its checkpoint; they become the
    bundle's original statistics and its cached ones for t, so Langevin and the VAE-only samples at t use exactly
    them. Returns the run's record of them (None for an NVAE run or a VAE without BN)."""
    if source.kind != "vaebm" or not hasattr(vae, "adopt_bn_statistics"):
        return None
    state = source.checkpoint.json("state.json") if source.checkpoint.has("state.json") else {}
    record = state.get("vae_bn", {"readjusted": False})
    if record.get("readjusted"):
        if not source.checkpoint.has(BN_FILE):
            raise UserError(f"checkpoint '{source.checkpoint.path}' records readjusted BN statistics but has no "
                            f"{BN_FILE}")
        vae.adopt_bn_statistics(record["temperature"], read_state_dict(source.checkpoint, BN_FILE))
        log(f"the energy was trained with BN statistics readjusted at t={record['temperature']:g}: they are the "
            f"bundle's original statistics")
    return record


def export_run(run_dir: Path, out: Path, *, step: int | None = None, weights: str | None = None,
               temperatures: tuple[float, ...] | list[float] = DEFAULT_TEMPERATURES, bn_passes: int = 500,
               bn_batch_size: int = 16, seed: int = 0, device: torch.device | str = "cpu", overwrite: bool = False,
               log: Callable[[str], None] = print) -> Path:
    """Write the bundle of a run to `out` (atomically); returns `out`. See the module docstring."""
    if bn_passes < 1 or bn_batch_size < 1:
        raise UserError("--bn-passes and --bn-batch-size must be >= 1")
    source = read_run(run_dir, step, weights)
    for note in source.notes:
        log(note)
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise UserError(f"'{out}' already exists; pass --overwrite to replace it")

    vae = build_vae(source.vae_config)
    weight_file = WEIGHT_FILES[source.vae_weights]
    if source.kind == "vaebm" and source.checkpoint.has("vae.safetensors"):  # a VAE fine-tuned with its energy prior
        log(f"using the VAE fine-tuned in {source.checkpoint.path}")
        _load(vae, read_state_dict(source.checkpoint, "vae.safetensors"), str(source.checkpoint.path / "vae.safetensors"))
    else:
        verify_file(source.vae_checkpoint, weight_file)  # an NVAE run's own checkpoint is verified whole above
        _load(vae, read_state_dict(source.vae_checkpoint, weight_file), str(source.vae_checkpoint.path / weight_file))
    vae = vae.to(device).eval().requires_grad_(False)
    energy_bn = energy_statistics(source, vae, log)
    energy = None
    if source.kind == "vaebm":
        energy = build_energy(source.energy_config, vae.z_shapes)
        _load(energy, read_state_dict(source.checkpoint, "energy.safetensors"),
              str(source.checkpoint.path / "energy.safetensors"))

    exported_temperatures: list[float] = []
    if hasattr(vae, "temperature_statistics"):  # NVAE: BN readjusted per temperature, cached in the bundle
        generator = torch.Generator(device=torch.device(device)).manual_seed(seed)
        # The readjustment restores running mean/var but advances num_batches_tracked: keep the
        # checkpoint's tensors exactly (the per-temperature cache is not part of the state dict).
        trained = {k: v.clone() for k, v in vae.state_dict().items()}
        for t in temperatures:
            if t in vae.cached_temperatures():  # the energy's own (energy_statistics)
                continue
            log(f"readjusting BN statistics at temperature {t:g} ({bn_passes} passes of batch {bn_batch_size}; "
                f"fewer with --bn-passes for a quick export)")
            with vae.temperature_statistics(t, passes=bn_passes, batch_size=bn_batch_size, generator=generator,
                                            progress=pass_reporter(t, bn_passes, log)):
                pass  # computes and caches; the original statistics come back on exit
        vae.load_state_dict(trained)
        exported_temperatures = vae.cached_temperatures()
    elif temperatures:
        log("note: this VAE has no BatchNorm; no statistics to readjust (every temperature works)")

    vae_run = source.vae_run or source.run_dir
    provenance = {
        "run": str(source.run_dir.resolve()), "kind": source.kind, "step": source.checkpoint.step,
        "checkpoint": str(source.checkpoint.path.resolve()),
        "vae_run": str(Path(vae_run).resolve()), "vae_checkpoint": str(source.vae_checkpoint.path.resolve()),
        "vae_step": source.vae_checkpoint.step, "vae_weights": source.vae_weights,
    }
    bn = {"passes": bn_passes, "batch_size": bn_batch_size, "seed": seed} if exported_temperatures else {}
    if energy_bn is not None:  # which statistics the energy was trained with (the bundle's original ones)
        bn["energy_statistics"] = energy_bn
    try:
        save_bundle(out, vae.cpu(), energy, source.energy_config if energy is not None else None,
                    method=source.method, sampling=source.sampling, source=provenance, bn=bn or None,
                    overwrite=overwrite)
    except BundleError as err:
        raise UserError(str(err)) from None
    log(f"wrote {out}: {source.kind} bundle from {source.checkpoint.path} (VAE {source.vae_checkpoint.path}, "
        f"{source.vae_weights} weights), BN temperatures {', '.join(f'{t:g}' for t in exported_temperatures) or 'none'}, "
        f"sampling defaults {source.sampling}")
    return out
