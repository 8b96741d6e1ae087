"""Posterior normalizing flows: paired volume-preserving autoregressive shift cells (NVAE §3.2).

Each `AutoregressiveShift` cell maps z ← z − μ(z), where μ at (channel c, pixel p) depends only on
pixels before p in raster order (all channels) and on channels < c at p itself. The Jacobian is
therefore triangular with a unit diagonal: log|det| = 0, so the flow changes the posterior's shape
without a log-det term. `PairedFlow` applies one cell with the causal mask and one with the
spatially mirrored mask, so information flows in both directions across the image.

The flows sit on the posterior path only: sampling from the prior never runs them (they only shape
q(z|x) during NVAE training). As officially, the encoder feature is not an input of the flow.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from models.layers import ELU, Conv2d


def autoregressive_mask(
    out_channels: int, in_channels: int, kernel_size: int, groups: int, zero_diagonal: bool, mirror: bool
) -> torch.Tensor:
    """PixelCNN-style mask [C_out, C_in/groups, k, k] (1 = connection kept).

    Spatial part: taps below the centre row and right of the centre are cut (raster order).
    Centre tap: channel-autoregressive. Channels are matched block-wise when the counts differ
    (one input channel ↔ C_out/C_in output channels, or the reverse); with `zero_diagonal` a block
    does not see its own channel, so the first conv of a cell sees only strictly earlier channels.
    A depthwise conv (groups = C) keeps its centre tap unless `zero_diagonal`.
    `mirror` flips the mask spatially (future pixels instead of past ones).
    """
    per_group_in = in_channels // groups
    mask = torch.ones(out_channels, per_group_in, kernel_size, kernel_size)
    centre = kernel_size // 2
    mask[:, :, centre + 1:, :] = 0.0
    mask[:, :, centre, centre + 1:] = 0.0
    if groups == 1:
        out_index = torch.arange(out_channels)[:, None]
        in_index = torch.arange(in_channels)[None, :]
        if out_channels >= in_channels:  # output block of each input channel
            out_block, in_block = out_index * in_channels // out_channels, in_index
        else:  # input block of each output channel
            out_block, in_block = out_index, in_index * out_channels // in_channels
        allowed = in_block < out_block if zero_diagonal else in_block <= out_block
        mask[:, :, centre, centre] = allowed.float()
    elif zero_diagonal:
        mask[:, :, centre, centre] = 0.0
    if mirror:
        mask = torch.flip(mask, dims=(2, 3))
    return mask


class MaskedConv2d(Conv2d):
    """Weight-normalized conv whose kernel is multiplied by a fixed autoregressive mask.

    The weight norm is taken over the masked kernel, and log_g starts at log(init_scale·‖v⊙m‖)
    (init_scale = 0.1 for the μ output conv, so each flow starts close to the identity).
    The mask is a non-persistent buffer: it is rebuilt from the constructor arguments.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, groups: int = 1, bias: bool = True,
        zero_diagonal: bool = False, mirror: bool = False, init_scale: float = 1.0,
    ):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, groups=groups, bias=bias)
        mask = autoregressive_mask(out_channels, in_channels, kernel_size, groups, zero_diagonal, mirror)
        self.register_buffer("mask", mask.to(self.weight.device), persistent=False)
        with torch.no_grad():
            self.weight.mul_(self.mask)
            norm = self._weight_norm(self.weight)
            self.log_weight_norm.copy_(torch.log(norm + 1e-2) + math.log(init_scale))

    def effective_weight(self) -> torch.Tensor:
        """The masked kernel, weight-normalized: exp(log_g)·(v⊙m)/‖v⊙m‖."""
        masked = self.weight * self.mask
        return masked * (torch.exp(self.log_weight_norm) / (self._weight_norm(masked) + 1e-5))


class AutoregressiveShift(nn.Module):
    """z ← z − μ(z), μ from a masked inverted residual:
    masked 3×3 (L → 6L, zero diagonal) → ELU → masked depthwise 5×5 → ELU → ELU → masked 1×1 → μ.

    The doubled ELU before the μ conv mirrors the official layer order (the inverted residual ends
    with an ELU and the μ head starts with one). [B, L, h, w] → [B, L, h, w], log-det 0.
    """

    def __init__(self, channels: int, mirror: bool, expansion: int = 6):
        super().__init__()
        hidden = channels * expansion
        self.conv_in = MaskedConv2d(channels, hidden, 3, bias=False, zero_diagonal=True, mirror=mirror)
        self.conv_depthwise = MaskedConv2d(hidden, hidden, 5, groups=hidden, bias=False, mirror=mirror)
        self.conv_mu = MaskedConv2d(hidden, channels, 1, bias=True, mirror=mirror, init_scale=0.1)
        self.elu = ELU()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """[B, L, h, w] → [B, L, h, w]: z − μ(z)."""
        h = self.elu(self.conv_in(z))
        h = self.elu(self.conv_depthwise(h))
        return z - self.conv_mu(self.elu(h))


class PairedFlow(nn.Module):
    """A causal then an anti-causal `AutoregressiveShift`: [B, L, h, w] → [B, L, h, w], log-det 0."""

    def __init__(self, channels: int):
        super().__init__()
        self.forward_cell = AutoregressiveShift(channels, mirror=False)
        self.backward_cell = AutoregressiveShift(channels, mirror=True)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """[B, L, h, w] → [B, L, h, w]: the causal then the anti-causal shift."""
        return self.backward_cell(self.forward_cell(z))
