"""Load a trained NVAE, frozen, from an NVAE run directory or one of its checkpoint directories."""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from models.registry import build_vae
from trainer.checkpoint import Checkpoint, latest_checkpoint
from trainer.config import from_dict
from trainer.errors import UserError
from trainer.sections import NVAETrainingConfig


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
