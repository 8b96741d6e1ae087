"""NVAE: the hierarchical VAE whose generative path VAEBM refines (README, Design).

    from models.nvae import NVAE, get_architecture
    model = NVAE(get_architecture("celeba64"))
    out = model(x)                      # x in [-1, 1]: NVAEOutput (recon log-prob, KL per group)
    gen = model.sample(16, temperature=0.7)
"""
from models.nvae.config import ARCHITECTURES, NVAEConfig, get_architecture
from models.nvae.model import NVAE, Generation, NVAEOutput

__all__ = ["ARCHITECTURES", "NVAEConfig", "get_architecture", "NVAE", "Generation", "NVAEOutput"]
