"""Trained models read back from run directories: the frozen VAE of an energy run (from an NVAE run directory or
one of its checkpoints, pinned by content for the energy run's whole life) with the BN statistics its energy
trains with, and a trained energy network."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import yaml

from models.energy import build_energy
from models.registry import build_vae
from trainer.config.ebm import VAEBMTrainingConfig
from trainer.config.loader import from_dict, read_yaml
from trainer.config.nvae import NVAETrainingConfig
from trainer.errors import UserError
from trainer.run.checkpoint import (Checkpoint, CorruptCheckpoint, is_imported, latest_checkpoint, list_checkpoints,
                                    verify_file)

WEIGHTS = {"ema": "ema.safetensors", "raw": "model.safetensors"}
BN_FILE = "vae_bn.safetensors"  # in an energy checkpoint: the frozen VAE's readjusted BN statistics


def resolve_vae_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(checkpoint directory, run config.yaml) for a run directory or a checkpoint directory."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"VAE path '{path}' does not exist")
    if (path / "config.yaml").is_file():  # a run directory: its newest complete checkpoint
        checkpoint = latest_checkpoint(path)
        if checkpoint is None:
            raise UserError(f"NVAE run '{path}' has no complete checkpoint yet")
        return checkpoint, path / "config.yaml"
    config = path.parent.parent / "config.yaml"  # RUN/checkpoints/step-NNNNNNN
    if (path / "manifest.json").is_file() and config.is_file():
        return path, config
    raise UserError(f"VAE path '{path}' is neither an NVAE run directory nor one of its checkpoints")


def pin_vae(path: str | Path, weights: str, pinned: dict | None, change_ok: bool,
            log: Callable[[str], None]) -> dict:
    """The VAE checkpoint an energy run trains against: {"vae_checkpoint", "vae_weights", "vae_sha256"}, the
    entries every energy checkpoint's state.json records.

    A new run (`pinned` None) pins what `path` resolves to now (a run directory: its newest checkpoint). A resumed
    run keeps the VAE its checkpoint pinned, found by content: the pinned checkpoint, or any checkpoint of `path`
    whose weights have the pinned SHA-256 (the NVAE run may have trained on or moved). If none has, the resume is
    refused naming both, unless `change_ok` (the user named the new VAE and said so). Its weights file is
    verified against its checkpoint's manifest either way.
    """
    name = WEIGHTS[weights]
    try:
        now = resolve_vae_checkpoint(path)[0]
    except UserError as err:
        now, missing = None, str(err)
    if pinned is None or not pinned.get("vae_checkpoint"):
        if now is None:
            raise UserError(missing)
        return _pin(now, weights)
    old, old_weights = Path(pinned["vae_checkpoint"]), pinned.get("vae_weights", weights)
    old_sha = pinned.get("vae_sha256") or _weights_sha(old, name, computed=True)  # an old pin: the file's digest
    named = now is not None and not (Path(path).expanduser() / "config.yaml").is_file()  # one checkpoint, by name
    if old_weights == weights and old_sha is not None:
        if named:  # the user named a checkpoint: it must be the pinned VAE
            candidates = [now]
        else:  # a run directory: wherever the pinned weights are now (the run may have trained on or moved)
            candidates = [old, *(p for _, p in reversed(list_checkpoints(Path(path).expanduser()))), now]
        for candidate in [c for c in candidates if c is not None]:
            if _weights_sha(candidate, name, computed=candidate in (old, now)) == old_sha:
                if candidate.resolve() != old.resolve():
                    log(f"the pinned VAE (sha256 {old_sha[:12]}…) is now at {candidate}")
                return _pin(candidate, weights)
    if old_weights != weights:
        what = f"with its {old_weights} weights (vae.weights is {weights} now)"
    elif not (old / name).is_file():
        what = "which is missing"
    elif _weights_sha(old, name, computed=True) != old_sha:
        what = "whose weights changed"
    else:
        what = "not the checkpoint vae.path names"
    if now is not None:
        now_sha = _weights_sha(now, name, computed=True) or "?"
        described_now = f"vae.path '{path}' now resolves to {now} (sha256 {now_sha[:12]}…)"
    else:
        described_now = missing
    if not change_ok:
        raise UserError(f"this energy run trained against VAE checkpoint {old} ({old_weights} weights, sha256 "
                        f"{(old_sha or '?')[:12]}…), {what}; {described_now}. To continue against the new VAE, "
                        f"re-run with --vae-changed-ok")
    if now is None:
        raise UserError(missing)
    log(f"VAE changed (--vae-changed-ok): was {old} (sha256 {(old_sha or '?')[:12]}…), now {now}")
    return _pin(now, weights)


def _pin(checkpoint_dir: Path, weights: str) -> dict:
    try:
        sha = verify_file(Checkpoint(checkpoint_dir), WEIGHTS[weights])
    except CorruptCheckpoint as err:
        raise UserError(f"the VAE checkpoint failed verification: {err}") from None
    return {"vae_checkpoint": str(Path(checkpoint_dir).resolve()), "vae_weights": weights, "vae_sha256": sha}


def _weights_sha(checkpoint_dir: Path, name: str, computed: bool) -> str | None:
    """The SHA-256 a checkpoint's manifest records for `name`; with `computed`, the file's own when the manifest
    has none (an old checkpoint). None when there is no such file."""
    try:
        checkpoint = Checkpoint(checkpoint_dir)
    except UserError:
        return None
    if name in checkpoint.digests:
        return checkpoint.digests[name]
    if computed and checkpoint.has(name):
        from models.files import file_digest

        return file_digest(checkpoint.path / name)
    return None


def load_frozen_vae(path: str | Path, weights: str = "ema", device: torch.device | str = "cpu"):
    """(VAE, checkpoint directory): the NVAE (or MLP VAE) in eval mode with requires_grad off (BN uses its stored statistics), and its checkpoint."""
    checkpoint_dir, config_path = resolve_vae_checkpoint(path)
    raw = yaml.safe_load(config_path.read_text()) or {}
    if "model" not in raw:
        raise UserError(f"'{config_path}' has no model section: not an NVAE run")
    cfg = from_dict(NVAETrainingConfig, {"model": raw["model"]}).model
    vae = build_vae(cfg)
    checkpoint = Checkpoint(checkpoint_dir)
    name = WEIGHTS[weights]
    try:
        vae.load_state_dict(checkpoint.tensors(name))
    except RuntimeError as err:
        raise UserError(f"'{checkpoint_dir / name}' does not match the NVAE of '{config_path}': "
                        f"{str(err).splitlines()[0]}") from None
    return vae.to(device).eval().requires_grad_(False), checkpoint_dir


@dataclass
class FrozenBN:
    """The BN statistics an energy is trained with (README, "BN statistics of an energy"): the NVAE's generative-
    path statistics readjusted at `temperature` before training (`statistics`), or, with temperature None, the
    statistics as trained (nothing to keep). `record` goes to state.json and bundle manifests."""

    temperature: float | None = None
    passes: int = 0
    batch_size: int = 0
    seed: int = 0
    statistics: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def record(self) -> dict:
        """The BN statistics in use as a JSON record (readjusted or not, and with which settings)."""
        if self.temperature is None:
            return {"readjusted": False}
        return {"readjusted": True, "temperature": self.temperature, "passes": self.passes,
                "batch_size": self.batch_size, "seed": self.seed}

    def describe(self) -> str:
        """The BN statistics in use, in words, for the log."""
        if self.temperature is None:
            return "BN statistics as trained"
        return (f"BN statistics readjusted at t={self.temperature:g} ({self.passes} passes of {self.batch_size}, "
                f"seed {self.seed})")

    def checkpoint_files(self) -> dict:
        """What an energy checkpoint keeps of them: {BN_FILE: statistics}, or nothing."""
        return {BN_FILE: self.statistics} if self.statistics else {}


def frozen_bn(vae, cfg: VAEBMTrainingConfig, checkpoint_path: Path | None, broadcast=None, log=None) -> FrozenBN:
    """Put the BN statistics the energy of `cfg` trains with into the frozen `vae` (in place) and return them.

    Readjusted (`vae.bn_temperature_for(method)`, an NVAE only) once, before training, by `NVAE.readjust_bn` with a
    generator seeded `vae.bn_seed`; a run resumed from `checkpoint_path` loads the ones its checkpoint kept
    instead (and refuses a checkpoint trained with other statistics), so resume and export are exact.
    `broadcast(tensors)`: the main process's copy on every process (None: one process).
    """
    temperature = cfg.vae.bn_temperature_for(cfg.method)
    wanted = FrozenBN(temperature, cfg.vae.bn_passes, cfg.vae.bn_batch_size, cfg.vae.bn_seed) \
        if temperature is not None and hasattr(vae, "readjust_bn") else FrozenBN()
    checkpoint = Checkpoint(checkpoint_path) if checkpoint_path is not None else None
    if checkpoint is not None and not is_imported(checkpoint):
        recorded = checkpoint.json("state.json").get("vae_bn", {"readjusted": False})
        if recorded != wanted.record:
            raise UserError(f"checkpoint '{checkpoint.path}' was trained with {describe_bn(recorded)}, but the config "
                            f"asks for {wanted.describe()} (vae.bn_temperature, vae.bn_passes, vae.bn_batch_size, "
                            f"vae.bn_seed); resume with the same settings or use a new --run-dir")
        if wanted.temperature is not None:
            wanted.statistics = checkpoint.tensors(BN_FILE)
            vae.load_bn_statistics(wanted.statistics)
        return wanted
    if wanted.temperature is None:
        return wanted
    if log is not None:
        log(f"readjusting the VAE's BN statistics at t={temperature:g} ({wanted.passes} passes of "
            f"{wanted.batch_size}) before energy training")
    device = next(vae.parameters()).device
    generator = torch.Generator(device=device).manual_seed(wanted.seed)
    vae.readjust_bn(temperature, passes=wanted.passes, batch_size=wanted.batch_size, generator=generator)
    statistics = vae.bn_statistics()
    if broadcast is not None:  # identical statistics on every process, whatever the device's arithmetic
        statistics = broadcast(statistics)
        vae.load_bn_statistics(statistics)
    wanted.statistics = statistics
    return wanted


def describe_bn(record: dict) -> str:
    """A run's `vae_bn` record (state.json) in words."""
    if not record.get("readjusted"):
        return "the BN statistics as trained"
    return FrozenBN(record["temperature"], record["passes"], record["batch_size"], record["seed"]).describe()


def check_vae_fits_data(vae, data, vae_path) -> None:
    """Refuse data whose images are not the size the frozen VAE makes (the energy scores both in one batch)."""
    if len(vae.image_shape) != 3 or data.is_toy:
        return
    side = vae.image_shape[-1]
    if side != data.image_size:
        raise UserError(f"the VAE '{vae_path}' makes {side}x{side} images but the data are {data.image_size}x"
                        f"{data.image_size} (data.image_size); train the NVAE on these images first, or give data of "
                        f"that size (make_shards.py --size {side}, or data.image_size={side} for a bundled dataset)")


def load_trained_energy(run_dir: Path, device, latent_shapes=None) -> torch.nn.Module:
    """The energy network of an energy run's newest checkpoint, in eval mode with requires_grad off.
    A latent energy (joint prior) needs the shapes of the VAE's latents (`vae.z_shapes`)."""
    checkpoint_path = latest_checkpoint(run_dir)
    if checkpoint_path is None:
        raise UserError(f"VAEBM run '{run_dir}' has no complete checkpoint")
    cfg = from_dict(VAEBMTrainingConfig, {"energy": read_yaml(Path(run_dir) / "config.yaml")["energy"]})
    net = build_energy(cfg.energy, latent_shapes)
    net.load_state_dict(Checkpoint(checkpoint_path).tensors("energy.safetensors"))
    return net.to(device).eval().requires_grad_(False)
