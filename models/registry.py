"""Build a VAE from its config: the NVAE for images, the MLP VAE for 2-D toy data, the VampPrior
paper's VAE/HVAE for binarized grey images."""
from __future__ import annotations

from models.hvae import HVAE, HVAEConfig
from models.mlp_vae import MLPVAE, MLPVAEConfig
from models.nvae import NVAE
from models.nvae.config import NVAEConfig


def build_vae(cfg: NVAEConfig | MLPVAEConfig | HVAEConfig):
    """All expose the same noise API: latent_shapes, image_shape, decode, encode_noise, sample."""
    if isinstance(cfg, MLPVAEConfig):
        return MLPVAE(cfg)
    if isinstance(cfg, HVAEConfig):
        return HVAE(cfg)
    return NVAE(cfg)


def is_image_model(vae) -> bool:
    """True if the VAE generates images ([C, H, W]), False for 2-D toy points."""
    return len(vae.image_shape) == 3
