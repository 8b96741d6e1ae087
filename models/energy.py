"""Energy networks E_ψ: conv ResNets on images (VAEBM Table 7) and MLPs on vectors.

An energy network maps a batch to one scalar per sample, shape [B]; low energy = likely. The
energy-based models of this project multiply a generator's density by exp(−E), so the sampler
(`models/langevin.py`) only ever needs `energy(x) -> [B]`.

Conv energies (VAEBM paper, Table 7 and App. E):

    3×3 conv (in→C) → LipSwish → ResBlocks → global SUM pooling over H×W → Linear(C_last, 1)

    ResBlock(in, out, down):  h = conv2(LipSwish(conv1(x))) + skip(x)
                              h = avgpool2x2(h) if down           (pool AFTER the addition)
                              return LipSwish(h)
    skip = 1×1 conv without bias when in ≠ out or down, identity otherwise.

Every conv is `models.layers.Conv2d` with weight normalization and data-dependent init; the final
Linear is plain (no WN) and is excluded from the spectral regularizer. There is no normalization
layer, so train/eval mode only matters for the one-time data-dependent init.

Input range: the energy scores the decoder's output, so it sees the decoder's range, [−1, 1]
(README, Design: data range). Positives must be mapped to the same range by the caller. A network whose weights
expect [0, 1] images (the official VAEBM networks, imported by `scripts/import_official.py`) is built
with `input_range="0..1"`: it still takes [−1, 1] and maps x → (x + 1)/2 before its first conv, an
exact affine (folding it into the first conv would be wrong at the zero-padded borders).

Parameter names follow the official checkpoints (`conv1`, `blocks.N.conv1/conv2/skip.0`, `linear`),
so parameter shapes can be compared one-to-one with the official networks (see the tests).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from models.configs import INPUT_RANGES, LAYOUTS, ConvLayout, EnergyNetConfig  # noqa: F401 (re-exported)
from models.layers import Conv2d, LipSwish, Swish
from models.spectral import SpectralRegularizer, collect_convs


class ResBlock(nn.Module):
    """conv3×3 → LipSwish → conv3×3, + skip, [avg-pool 2×2], LipSwish. [B, in, H, W] → [B, out, H', W']."""

    def __init__(self, in_channels: int, out_channels: int, downsample: bool, data_init: bool = True):
        super().__init__()
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1, weight_norm=True, data_init=data_init)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, weight_norm=True, data_init=data_init)
        self.downsample = downsample
        if in_channels != out_channels or downsample:
            # A one-element Sequential only so the parameter names match the official ones (skip.0.*).
            self.skip = nn.Sequential(
                Conv2d(in_channels, out_channels, 1, bias=False, weight_norm=True, data_init=data_init)
            )
        else:
            self.skip = nn.Identity()
        self.act = LipSwish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in, H, W] → [B, out, H', W'] (H' = H/2 when downsampling)."""
        h = self.conv2(self.act(self.conv1(x))) + self.skip(x)
        if self.downsample:
            h = F.avg_pool2d(h, 2)  # after the addition, as in the official network
        return self.act(h)


class EnergyBase(nn.Module):
    """What every energy offers besides `forward(x) -> [B]`: spectral loss and data-dependent init."""

    spectral: SpectralRegularizer

    def spectral_loss(self) -> torch.Tensor:
        """Σ σ_max over every conv kernel (a scalar, differentiable). Advances the power iteration."""
        return self.spectral()

    @torch.no_grad()
    def initialize_from_data(self, x: torch.Tensor) -> None:
        """Run the data-dependent init of the WN convs on a batch x (e.g. a few stacked data batches).

        One forward pass in train mode under no_grad; each conv sets its bias and scale so its output
        has per-channel mean 0 and std 0.2 on this batch (all-reduced across ranks by `Conv2d`). A
        conv already initialized (flag `data_init_done`, restored with the state dict) is left alone,
        so calling this after loading a checkpoint changes nothing.
        """
        was_training = self.training
        self.train()
        try:
            with torch.compiler.set_stance("force_eager"):  # a compiled network: one pass is not worth compiling
                self(x)
        finally:
            self.train(was_training)

    @property
    def data_init_done(self) -> bool:
        """True when every conv that wants a data-dependent init has had it."""
        return all(bool(conv.data_init_done) for conv in collect_convs(self))


class ConvEnergy(EnergyBase):
    """Conv ResNet energy of Table 7. Input [B, in_channels, H, W] in [−1, 1]; output energies [B].

    `input_range="0..1"`: the weights expect [0, 1] images (official VAEBM networks); the [−1, 1]
    input is mapped there first. `gradient_checkpointing`: each ResBlock is recomputed in backward
    (non-reentrant `torch.utils.checkpoint`) whenever a graph is recorded, Langevin's included.
    """

    def __init__(
        self,
        layout: ConvLayout,
        in_channels: int = 3,
        base_channels: int | None = None,
        image_size: int | None = None,
        data_init: bool = True,
        input_range: str = "-1..1",
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        if input_range not in INPUT_RANGES:
            raise ValueError(f"input_range must be one of {', '.join(INPUT_RANGES)}, got {input_range!r}")
        self.input_range = input_range
        self.gradient_checkpointing = gradient_checkpointing  # settable on the instance
        c = base_channels or layout.base_channels
        self.image_size = image_size or layout.image_size
        num_down = sum(down for _, down in layout.blocks)
        if self.image_size % (2**num_down) != 0:
            raise ValueError(f"image_size {self.image_size} is not divisible by 2^{num_down} (the layout's downsamples)")
        self.conv1 = Conv2d(in_channels, c, 3, padding=1, weight_norm=True, data_init=data_init)
        blocks, width = [], c
        for multiplier, down in layout.blocks:
            blocks.append(ResBlock(width, multiplier * c, down, data_init))
            width = multiplier * c
        self.blocks = nn.Sequential(*blocks)
        self.act = LipSwish()
        self.linear = nn.Linear(width, 1)  # plain Linear: no WN, not spectrally regularized
        # Built last, over the convs only; a submodule so its u/v vectors live in the state dict.
        self.spectral = SpectralRegularizer(collect_convs(self))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] in [−1, 1] → energies [B]."""
        if self.input_range == "0..1":
            x = (x + 1.0) * 0.5
        h = self.act(self.conv1(x))
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                # Non-reentrant: works when only the input needs a gradient (Langevin) and keeps no
                # block activations, only each block's input. No randomness or BN inside, so the
                # recomputed activations are exact.
                h = checkpoint(block, h, use_reentrant=False)
            else:
                h = block(h)
        h = h.sum(dim=(2, 3))  # global SUM pooling (not mean): [B, C_last]
        return self.linear(h).squeeze(-1)


class MLPEnergy(EnergyBase):
    """MLP energy for 2-D points and latent vectors: depth × (Linear → Swish), then Linear(hidden, 1),
    on the input times `input_scale` (1 by default).

    Input [B, input_dim] or any [B, ...] with input_dim elements per sample (latent maps are
    flattened). Output [B]. `spectral_loss()` sums the spectral norms of the linear weights (the VAEBM
    energies' Lipschitz control, `optim.spectral_coeff`); `initialize_from_data` is a no-op.
    """

    def __init__(self, input_dim: int, hidden: int = 256, depth: int = 4, input_scale: float = 1.0):
        super().__init__()
        if depth < 1:
            raise ValueError(f"MLP depth must be at least 1, got {depth}")
        if not input_scale > 0:
            raise ValueError(f"MLP input_scale must be > 0, got {input_scale}")
        layers: list[nn.Module] = []
        width = input_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), Swish()]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)
        self.input_dim = input_dim
        self.input_scale = float(input_scale)  # a constant of the architecture, not a parameter
        self.spectral = SpectralRegularizer([layer for layer in self.net if isinstance(layer, nn.Linear)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, input_dim] (or [B, ...] flattening to input_dim) → energies [B]."""
        return self.net(x.flatten(1) * self.input_scale).squeeze(-1)  # × 1.0 is exact: scale-1 nets are unchanged

    def spectral_loss(self) -> torch.Tensor:
        """Σ σ_max over the linear weights, differentiable (advances the power iteration)."""
        return self.spectral()


def build_energy(cfg: EnergyNetConfig, latent_shapes: list[tuple[int, ...]] | None = None) -> nn.Module:
    """The energy network described by `cfg`. A "latent" energy also needs the VAE's per-sample
    `latent_shapes` (top group first), which are a property of the VAE, not of the config."""
    if cfg.kind == "mlp":
        return MLPEnergy(cfg.input_dim, cfg.hidden, cfg.depth, cfg.input_scale)
    if cfg.kind == "latent":
        from models.latent_energy import LatentEnergy

        if latent_shapes is None:
            raise ValueError("a latent energy needs the VAE's latent_shapes")
        return LatentEnergy(latent_shapes, cfg.hidden, cfg.depth, cfg.layerwise, cfg.joint)
    if cfg.kind != "conv":
        raise ValueError(f"unknown energy kind {cfg.kind!r}; expected 'conv', 'mlp' or 'latent'")
    if cfg.layout not in LAYOUTS:
        raise ValueError(f"unknown energy layout {cfg.layout!r}; known: {', '.join(LAYOUTS)}")
    return ConvEnergy(LAYOUTS[cfg.layout], cfg.in_channels, cfg.base_channels, cfg.image_size, cfg.data_init,
                      cfg.input_range, cfg.gradient_checkpointing)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters (including the WN log-gains, as the official counts do)."""
    return sum(p.numel() for p in module.parameters())
