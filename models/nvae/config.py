"""NVAE architecture configuration and the registry of named architectures.

`NVAEConfig` describes one NVAE. The field names follow the official command-line
flags loosely (`--num_channels_enc` → `channels_enc`, `--num_nf` → `num_flows`, ...). The defaults
are the `nvae-bench-small` architecture. `ARCHITECTURES` maps a preset name to its config; the
trainer's config layer looks names up here (`model: celebahq256` in a preset).

Models must not import the trainer, so `validate()` raises a plain `ValueError` naming the field;
the config layer turns it into a user-facing error.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from models.configs import PSEUDO_INITS

PRIORS = ("standard", "vamp")  # the prior of the top latent group (names as in models/hvae.py)


@dataclass
class NVAEConfig:
    """One NVAE architecture. All the paper presets use res_mbconv cells (the only kind built here)."""

    image_size: int = 32  # input height = width, in pixels
    in_channels: int = 3  # image channels (3 colour, 1 grey)
    channels_enc: int = 32  # encoder channels at full resolution (doubled at every down-sampling)
    channels_dec: int = 32  # decoder channels at full resolution (doubled at every down-sampling)
    num_latent_scales: int = 2  # number of latent resolutions
    groups_per_scale: int = 4  # latent groups per scale (at the highest-resolution scale with ada_groups)
    ada_groups: bool = False  # halve the group count at every lower-resolution scale (official --ada_groups)
    min_groups_per_scale: int = 1  # floor for the halving of ada_groups
    latents_per_group: int = 20  # channels of each latent group z_l
    cells_per_cond_enc: int = 2  # encoder residual cells per latent group
    cells_per_cond_dec: int = 2  # decoder residual cells per latent group (none before the first)
    preprocess_blocks: int = 1  # encoder stem blocks, each ending with a ×½ down-sampling cell
    preprocess_cells: int = 2  # cells per preprocess block (the last one down-samples)
    postprocess_blocks: int = 1  # decoder output blocks, each starting with a ×2 up-sampling cell
    postprocess_cells: int = 2  # cells per postprocess block (the first one up-samples)
    use_se: bool = True  # squeeze-and-excitation at the end of every residual cell
    residual_posterior: bool = True  # q(z_l) = N(μ_p + Δμ, log σ_p + Δlog σ) (official --res_dist)
    num_flows: int = 0  # paired autoregressive flow cells per latent group, posterior path only
    num_x_bits: int = 8  # input bit depth; < 8 quantizes the input inside forward (official --num_x_bits)
    decoder: str = "gaussian"  # output distribution p(x|z); only the Gaussian of VAEBM is built
    bn_momentum: float = 0.05  # BatchNorm running-statistics momentum (official value)
    bn_eps: float = 1e-5  # BatchNorm epsilon
    gradient_checkpointing: bool = False  # recompute cell activations in backward to save memory
    channels_last: bool = True  # run activations in NHWC layout (≈2× faster training on CPU, measured)
    prior: str = "standard"  # prior of the top group: standard (N(0, 1.01²)) or vamp (VampPrior, models/vampprior.py)
    pseudo_inputs: int = 50  # K, VampPrior components: learned pseudo-images encoded to q(z_1|u_k) (prior: vamp)
    pseudo_init: str = "data"  # VampPrior pseudo-images start as random training images (data) or noise

    # ------------------------------------------------------------------------------------------
    # Derived quantities.

    def groups_per_scale_encoder_order(self) -> list[int]:
        """Groups per latent scale, highest resolution first."""
        if not self.ada_groups:
            return [self.groups_per_scale] * self.num_latent_scales
        counts = [self.groups_per_scale]
        for _ in range(self.num_latent_scales - 1):
            counts.append(max(self.min_groups_per_scale, counts[-1] // 2))
        return counts

    def groups_per_scale_decoder_order(self) -> list[int]:
        """Groups per latent scale, lowest resolution (the top of the hierarchy) first."""
        return list(reversed(self.groups_per_scale_encoder_order()))

    @property
    def top_resolution(self) -> int:
        """Spatial size of the top (lowest-resolution) latent groups."""
        return self.image_size // 2 ** (self.preprocess_blocks + self.num_latent_scales - 1)

    @property
    def top_multiplier(self) -> int:
        """Channel multiplier at the top scale: channels there are channels_enc/dec times this."""
        return 2 ** (self.preprocess_blocks + self.num_latent_scales - 1)

    def validate(self) -> "NVAEConfig":
        """Raise ValueError naming the first bad field; return self so calls can chain."""
        positive = (
            "image_size", "in_channels", "channels_enc", "channels_dec", "num_latent_scales",
            "groups_per_scale", "min_groups_per_scale", "latents_per_group", "preprocess_cells",
            "postprocess_cells", "pseudo_inputs",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"NVAE config field '{name}' must be a positive integer, got {value!r}")
        for name in ("cells_per_cond_enc", "cells_per_cond_dec", "preprocess_blocks", "postprocess_blocks", "num_flows"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"NVAE config field '{name}' must be a non-negative integer, got {value!r}")
        if self.postprocess_blocks != self.preprocess_blocks:
            # Each pre block halves the resolution and each post block doubles it back.
            raise ValueError(
                f"NVAE config field 'postprocess_blocks' ({self.postprocess_blocks}) must equal "
                f"'preprocess_blocks' ({self.preprocess_blocks}) so the output matches the input size"
            )
        factor = self.top_multiplier
        if self.image_size % factor != 0:
            raise ValueError(
                f"NVAE config field 'image_size' ({self.image_size}) must be divisible by "
                f"2^(preprocess_blocks + num_latent_scales - 1) = {factor}"
            )
        if not (1 <= self.num_x_bits <= 8):
            raise ValueError(f"NVAE config field 'num_x_bits' must be in 1..8, got {self.num_x_bits}")
        if self.decoder != "gaussian":
            raise ValueError(f"NVAE config field 'decoder' must be 'gaussian' (the only one built), got {self.decoder!r}")
        if not (0.0 < self.bn_momentum <= 1.0):
            raise ValueError(f"NVAE config field 'bn_momentum' must be in (0, 1], got {self.bn_momentum}")
        if not 0.0 < self.bn_eps <= 1.0:
            raise ValueError(f"NVAE config field 'bn_eps' must be in (0, 1], got {self.bn_eps}")
        if self.prior not in PRIORS:
            raise ValueError(f"NVAE config field 'prior' must be one of {', '.join(PRIORS)}, got {self.prior!r}")
        if self.pseudo_init not in PSEUDO_INITS:
            raise ValueError(f"NVAE config field 'pseudo_init' must be one of {', '.join(PSEUDO_INITS)}, "
                             f"got {self.pseudo_init!r}")
        return self

    def replace(self, **changes) -> "NVAEConfig":
        """A copy with some fields changed (dataclasses.replace)."""
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------
# Named architectures. The four paper presets are the VAEBM NVAE backbones: res_mbconv
# cells, SE, residual posterior, 1 pre- and 1 post-process block of 2 cells, 2 cells per
# conditional, 20 latents per group, Gaussian decoder.

_PAPER = dict(
    latents_per_group=20, cells_per_cond_enc=2, cells_per_cond_dec=2, preprocess_blocks=1,
    preprocess_cells=2, postprocess_blocks=1, postprocess_cells=2, use_se=True,
    residual_posterior=True, decoder="gaussian",
)

ARCHITECTURES: dict[str, NVAEConfig] = {
    # A CPU demo for 32×32 digit images (the bundled grey digits, replicated to RGB): 16 channels,
    # two single-cell pre/post blocks (so the latents sit at 8×8 and 4×4, where cells are cheap),
    # 2 scales × 2 groups, one cell per conditional. About 2× cheaper per step than one pre/post
    # block of 2 cells with latents at 16×16 and 8×8 (measured), which matters on 2 CPU cores.
    "digits": NVAEConfig(
        image_size=32, in_channels=3, channels_enc=16, channels_dec=16, num_latent_scales=2,
        groups_per_scale=2, latents_per_group=20, cells_per_cond_enc=1, cells_per_cond_dec=1,
        preprocess_blocks=2, preprocess_cells=1, postprocess_blocks=2, postprocess_cells=1,
        use_se=True, residual_posterior=True, num_flows=0,
    ),
    # The benchmark architecture of README, Benchmarks (also the NVAEConfig defaults).
    "nvae-bench-small": NVAEConfig(
        image_size=32, in_channels=3, channels_enc=32, channels_dec=32, num_latent_scales=2,
        groups_per_scale=4, num_flows=0, **_PAPER,
    ),
    "cifar10": NVAEConfig(
        image_size=32, channels_enc=128, channels_dec=128, num_latent_scales=1, groups_per_scale=30,
        num_flows=1, **_PAPER,
    ),
    "celeba64": NVAEConfig(
        image_size=64, channels_enc=48, channels_dec=48, num_latent_scales=3, groups_per_scale=5,
        num_flows=1, **_PAPER,
    ),
    "lsun_church64": NVAEConfig(
        image_size=64, channels_enc=48, channels_dec=48, num_latent_scales=3, groups_per_scale=5,
        num_flows=1, **_PAPER,
    ),
    "celebahq256": NVAEConfig(
        image_size=256, channels_enc=32, channels_dec=32, num_latent_scales=5, groups_per_scale=4,
        num_flows=2, num_x_bits=5, **_PAPER,
    ),
}


def get_architecture(name: str) -> NVAEConfig:
    """A fresh copy of a registered architecture; KeyError lists the known names."""
    if name not in ARCHITECTURES:
        raise KeyError(f"unknown NVAE architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    return dataclasses.replace(ARCHITECTURES[name])
