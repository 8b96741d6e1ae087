"""The networks' configuration dataclasses that the trainer's config tree reads, without importing torch.

The config tree (`trainer/config/`) validates a whole run's settings before anything heavy is imported, so
`--help`, `--print-config` and config errors answer in about a second. These classes describe the networks
outside `models/nvae/` (whose `NVAEConfig` lives in `models/nvae/config.py`, torch-free too); the network
modules re-export them, so `from models.energy import EnergyNetConfig` keeps working.
"""
from __future__ import annotations

from dataclasses import dataclass

METHODS = ("vaebm", "latent-tilting", "joint-prior")  # energy methods (models/adapters.py)
PSEUDO_INITS = ("data", "noise")  # how VampPrior pseudo-inputs start (models/vampprior.py)
HVAE_PRIORS = ("standard", "vamp")  # prior of the HVAE's top level (models/hvae.py)
ACTIVATION_NAMES = ("swish", "relu", "elu", "tanh")  # MLP VAE activations (models/mlp_vae.py)


# ----------------------------------------------------------------------------------------------
# Energy networks (models/energy.py, models/latent_energy.py).


@dataclass(frozen=True)
class ConvLayout:
    """One row of Table 7: stem width C and the ResBlocks as (width multiplier of C, downsample)."""

    base_channels: int
    image_size: int
    blocks: tuple[tuple[int, bool], ...]


INPUT_RANGES = ("-1..1", "0..1")  # image ranges a conv energy's weights can expect (EnergyNetConfig.input_range)
D, S = True, False  # a ResBlock that downsamples / keeps the resolution
LAYOUTS: dict[str, ConvLayout] = {
    # CIFAR-10, C=128: conv 128 | d128, 128 | d256, 256 | d256, 256 | FC. 32 → 4. 5.14 M params.
    "cifar10": ConvLayout(128, 32, ((1, D), (1, S), (2, D), (2, S), (2, D), (2, S))),
    # CelebA 64, C=64: conv 64 | d64, 64 | d128, 128 | d128, 256 | d256, 256 | FC. 64 → 4. 4.34 M.
    "celeba64": ConvLayout(64, 64, ((1, D), (1, S), (2, D), (2, S), (2, D), (4, S), (4, D), (4, S))),
    # LSUN Church 64, C=64: conv 64 | d64, 64 | d128, 128, 128 | d128, 256, 256 | d256, 256. 5.81 M.
    "lsun_church64": ConvLayout(
        64, 64, ((1, D), (1, S), (2, D), (2, S), (2, S), (2, D), (4, S), (4, S), (4, D), (4, S))
    ),
    # CelebA-HQ 256, C=64: conv 64 | d64, 64 | d128, 128 | d128, 128 | d256, 256 | d256, 256 |
    # d512, 512 | FC. 256 → 4. 14.21 M.
    "celebahq256": ConvLayout(
        64, 256, ((1, D), (1, S), (2, D), (2, S), (2, D), (2, S), (4, D), (4, S), (4, D), (4, S), (8, D), (8, S))
    ),
    # Small layouts for CPU demos (bundled digits). 32×32: conv 32 | d32, 32 | d64, 64 | d64. 32 → 4.
    "digits": ConvLayout(32, 32, ((1, D), (1, S), (2, D), (2, S), (2, D))),
    # 16×16: conv 32 | d32 | d64, 64. 16 → 4.
    "digits16": ConvLayout(32, 16, ((1, D), (2, D), (2, S))),
}


@dataclass
class EnergyNetConfig:
    """Which energy network to build (`build_energy`)."""

    kind: str = "conv"
    """"conv" (image energy, a Table 7 layout), "mlp" (2-D points, vectors) or "latent" (the joint
    latent EBM prior's energy over all latent groups, `models/latent_energy.py`)."""
    layout: str = "cifar10"
    """Conv layout name, a key of `LAYOUTS`."""
    base_channels: int | None = None
    """Stem width C; None takes the layout's (128 for cifar10, 64 for the others, 32 for digits)."""
    image_size: int | None = None
    """Input height = width; None takes the layout's. Must be divisible by 2^(number of downsamples)."""
    in_channels: int = 3
    """Image channels (3 for RGB, 1 for grey digits)."""
    data_init: bool = True
    """Data-dependent init of the WN convs (paper: on; the official distributed script: off)."""
    input_range: str = "-1..1"
    """Conv only: the image range the weights expect. Inputs are always [−1, 1]; "0..1" (official
    VAEBM networks) maps them to [0, 1] inside the network."""
    gradient_checkpointing: bool = False
    """Conv only: recompute each ResBlock's activations during backward (less memory at 256×256,
    more compute; same energies and gradients). A runtime switch: a resumed run may change it."""
    input_dim: int = 2
    """MLP input size: 2 for 2-D toys, the flattened latent size for latent energies."""
    input_scale: float = 1.0
    """"mlp" only: inputs are multiplied by this before the first layer, which scales that layer's
    initial weights and, under Adam, its learning rate by the same factor: how fast the energy can
    resolve structure finer than its input's range (2-D toys: README, "Latent tilting on 25-Gaussians")."""
    hidden: int = 256
    """MLP hidden width."""
    depth: int = 4
    """Number of hidden layers of the MLP (for "latent": of each vector group's feature MLP)."""
    layerwise: bool = True
    """"latent" only: the layer-wise terms f_l(z_l)."""
    joint: bool = True
    """"latent" only: the joint coupling term f_joint(z_1, …, z_L)."""

    def validate(self) -> None:
        """Check the input range is known and, if not -1..1, that the energy is a conv energy; likewise
        that an input scale other than 1 is positive and belongs to an MLP energy."""
        if self.input_range not in INPUT_RANGES:
            raise ValueError(f"input_range must be one of {', '.join(INPUT_RANGES)}, got {self.input_range!r}")
        if self.input_range != "-1..1" and self.kind != "conv":
            raise ValueError(f"input_range {self.input_range!r} applies to conv energies only (kind is {self.kind!r})")
        if not self.input_scale > 0:
            raise ValueError(f"input_scale must be > 0, got {self.input_scale}")
        if self.input_scale != 1.0 and self.kind != "mlp":
            raise ValueError(f"input_scale applies to mlp energies only (kind is {self.kind!r})")


# ----------------------------------------------------------------------------------------------
# The VampPrior paper's VAE/HVAE (models/hvae.py) and the toys' MLP VAE (models/mlp_vae.py).


@dataclass
class HVAEConfig:
    """The VampPrior paper's VAE (levels 1) or two-level HVAE (levels 2) on binarized grey images."""

    image_size: int = 8  # H = W; the grey image has image_size² binary pixels
    in_channels: int = 3  # channels of the input and output tensors (grey replicated; bundled digits: 3)
    levels: int = 2  # 1: VAE p(x|z) p(z); 2: HVAE p(x|z1, z2) p(z1|z2) p(z2)
    prior: str = "standard"  # prior of the top level: standard (N(0, I)) or vamp (VampPrior)
    pseudo_inputs: int = 50  # K, VampPrior components (prior: vamp)
    pseudo_init: str = "data"  # VampPrior pseudo-inputs start as random training images (data) or noise
    latent_dim: int = 40  # units of every latent level (z, or z1 and z2)
    hidden: int = 300  # units of every gated dense layer
    min_log_var: float = -6.0  # log σ² of every Gaussian is clamped to [min_log_var, max_log_var]
    max_log_var: float = 2.0

    def validate(self) -> None:
        """Check sizes are positive integers, levels, prior, pseudo-input init and the log-variance bounds."""
        for name in ("image_size", "in_channels", "pseudo_inputs", "latent_dim", "hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.levels not in (1, 2):
            raise ValueError(f"levels must be 1 or 2, got {self.levels!r}")
        if self.prior not in HVAE_PRIORS:
            raise ValueError(f"prior must be one of {', '.join(HVAE_PRIORS)}, got {self.prior!r}")
        if self.pseudo_init not in PSEUDO_INITS:
            raise ValueError(f"pseudo_init must be one of {', '.join(PSEUDO_INITS)}, got {self.pseudo_init!r}")
        if not -30.0 <= self.min_log_var < self.max_log_var <= 30.0:
            raise ValueError(f"min_log_var ({self.min_log_var}) must be < max_log_var ({self.max_log_var}), both in "
                             f"[-30, 30]")


@dataclass
class MLPVAEConfig:
    """The small fully-connected VAE of the 2-D toys (VAEBM §5.4: 4 × 256 units, a 20-d latent)."""

    data_dim: int = 2  # D, the length of a data vector
    latent_dim: int = 20  # L, the length of the one latent vector
    hidden: int = 256  # units of every hidden layer
    depth: int = 4  # fully-connected hidden layers in the encoder and in the decoder (each + a linear head)
    activation: str = "swish"  # one of ACTIVATION_NAMES (models/mlp_vae.py builds them)
    min_log_sigma: float = -7.0  # smooth floor of the decoder log σ_x (σ_x ≥ e⁻⁷ ≈ 9·10⁻⁴)

    def validate(self) -> None:
        """Check sizes are positive integers, the activation is known and min_log_sigma is in [-30, 10]."""
        for name in ("data_dim", "latent_dim", "hidden", "depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.activation not in ACTIVATION_NAMES:
            raise ValueError(f"activation must be one of {sorted(ACTIVATION_NAMES)}, got {self.activation!r}")
        if not -30.0 <= self.min_log_sigma <= 10.0:
            raise ValueError(f"min_log_sigma must be in [-30, 10], got {self.min_log_sigma!r}")
