"""Trained models read back from run directories: the frozen VAE of an energy run (from an NVAE run directory or
one of its checkpoints), and a trained energy network."""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from models.energy import build_energy
from models.registry import build_vae
from trainer.config.ebm import VAEBMTrainingConfig
from trainer.config.loader import from_dict, read_yaml
from trainer.config.nvae import NVAETrainingConfig
from trainer.errors import UserError
from trainer.run.checkpoint import Checkpoint, latest_checkpoint


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


def load_frozen_vae(path: str | Path, weights: str = "ema", device: torch.device | str = "cpu"):
    """(VAE, checkpoint directory): the NVAE (or MLP VAE) in eval mode with requires_grad off (BN uses its stored statistics), and its checkpoint."""
    checkpoint_dir, config_path = resolve_vae_checkpoint(path)
    raw = yaml.safe_load(config_path.read_text()) or {}
    if "model" not in raw:
        raise UserError(f"'{config_path}' has no model section: not an NVAE run")
    cfg = from_dict(NVAETrainingConfig, {"model": raw["model"]}).model
    vae = build_vae(cfg)
    checkpoint = Checkpoint(checkpoint_dir)
    name = "ema.safetensors" if weights == "ema" else "model.safetensors"
    try:
        vae.load_state_dict(checkpoint.tensors(name))
    except RuntimeError as err:
        raise UserError(f"'{checkpoint_dir / name}' does not match the NVAE of '{config_path}': "
                        f"{str(err).splitlines()[0]}") from None
    return vae.to(device).eval().requires_grad_(False), checkpoint_dir


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
