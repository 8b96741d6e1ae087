"""NVAE: the hierarchical VAE whose generative path VAEBM refines (README, Design).

    from models.nvae import NVAE, get_architecture
    model = NVAE(get_architecture("celeba64"))
    out = model(x)                      # x in [-1, 1]: NVAEOutput (recon log-prob, KL per group)
    gen = model.sample(16, temperature=0.7)

The network classes are imported on first use, so `models.nvae.config` (the architectures, read by the
trainer's config tree) loads without torch.
"""
from models.nvae.config import ARCHITECTURES, NVAEConfig, get_architecture

__all__ = ["ARCHITECTURES", "NVAEConfig", "get_architecture", "NVAE", "Generation", "NVAEOutput"]
_FROM_MODEL = ("NVAE", "Generation", "NVAEOutput")


def __getattr__(name: str):
    """`models.nvae.NVAE` and friends, imported from `models.nvae.model` when first asked for."""
    if name in _FROM_MODEL:
        from models.nvae import model

        return getattr(model, name)
    raise AttributeError(f"module 'models.nvae' has no attribute {name!r}")
