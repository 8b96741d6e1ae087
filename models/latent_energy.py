"""Latent-space energies for the joint latent EBM prior (Cui, Wu & Han 2023, arXiv 2306.06323).

The prior of a hierarchical generator is tilted as p(z) ∝ exp(Σ_l f_l(z_l) + f_joint(z))·p_hier(z).
In this project every energy is "low = likely", so the network returns

    E(z) = −Σ_l f_l(z_l) − f_joint(z)                              [B]

Each latent group z_l is summarized into features h_l [B, hidden]:
- a latent map [B, C, h, w] keeps its spatial layout, as in the authors' public code (per-group energies of
  strided 4×4 convolutions with LeakyReLU(0.2) down to 4×4, flattened, then linear layers): stride-2 convs
  halve the side while it is above 4 (a group already at 4×4 or less gets one 3×3 conv), the map is flattened
  and a linear layer gives h_l. Pooling would make the energy blind to where a latent unit sits in the map.
- a latent vector [B, D] goes through an MLP.
The layer-wise term f_l is a linear head on h_l (contextual relations inside a layer); the joint term f_joint is
an MLP on [h_1, …, h_L] (the coupling between layers). Plain layers: no weight norm, no data-dependent init, no
spectral penalty.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from models.layers import Swish

MAP_SIDE = 4        # latent maps are reduced to at most this side before they are flattened
LEAKY_SLOPE = 0.2   # the authors' per-group energies use LeakyReLU(0.2)


def _map_features(shape: Sequence[int], hidden: int) -> nn.Module:
    """Strided convs down to at most MAP_SIDE×MAP_SIDE, flatten, linear: [B, C, h, w] → [B, hidden]."""
    channels, height, width = shape
    layers: list[nn.Module] = []
    if max(height, width) <= MAP_SIDE:
        layers += [nn.Conv2d(channels, hidden, 3, padding=1), nn.LeakyReLU(LEAKY_SLOPE)]
    while max(height, width) > MAP_SIDE:
        layers += [nn.Conv2d(channels, hidden, 4, stride=2, padding=1), nn.LeakyReLU(LEAKY_SLOPE)]
        channels, height, width = hidden, height // 2, width // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(hidden * height * width, hidden), nn.LeakyReLU(LEAKY_SLOPE))


def _vector_features(width: int, hidden: int, depth: int) -> nn.Module:
    """depth × (Linear → Swish): [B, D] → [B, hidden]."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), Swish()]
        width = hidden
    return nn.Sequential(*layers)


def _features(shape: Sequence[int], hidden: int, depth: int) -> nn.Module:
    """A feature extractor for one latent group of per-sample `shape` → [B, hidden]."""
    if len(shape) == 1:
        return _vector_features(shape[0], hidden, depth)
    if len(shape) == 3:
        return _map_features(shape, hidden)
    raise ValueError(f"latent groups must be [D] or [C, h, w] per sample, got {tuple(shape)}")


class LatentEnergy(nn.Module):
    """E(z) = −Σ_l f_l(z_l) − f_joint(z) over the groups z = [z_1 (top), …, z_L]; returns [B]."""

    def __init__(self, latent_shapes: Sequence[Sequence[int]], hidden: int = 128, depth: int = 2,
                 layerwise: bool = True, joint: bool = True):
        super().__init__()
        if not (layerwise or joint):
            raise ValueError("a latent energy needs the layer-wise terms, the joint term, or both")
        self.latent_shapes = [tuple(int(d) for d in shape) for shape in latent_shapes]
        self.features = nn.ModuleList(_features(shape, hidden, depth) for shape in self.latent_shapes)
        self.layer_heads = nn.ModuleList(nn.Linear(hidden, 1) for _ in self.latent_shapes) if layerwise else None
        self.joint_head = nn.Sequential(nn.Linear(hidden * len(self.latent_shapes), hidden), Swish(),
                                        nn.Linear(hidden, 1)) if joint else None

    def forward(self, z: Sequence[torch.Tensor]) -> torch.Tensor:
        """z: L tensors [B, *latent_shapes[l]] → energies [B]."""
        if len(z) != len(self.features):
            raise ValueError(f"expected {len(self.features)} latent groups, got {len(z)}")
        h = [extract(z_l) for extract, z_l in zip(self.features, z)]  # L × [B, hidden]
        f = h[0].new_zeros(h[0].shape[0])
        if self.layer_heads is not None:
            f = f + sum(head(h_l).squeeze(-1) for head, h_l in zip(self.layer_heads, h))
        if self.joint_head is not None:
            f = f + self.joint_head(torch.cat(h, dim=1)).squeeze(-1)
        return -f

    def spectral_loss(self) -> torch.Tensor:
        """No spectral penalty on latent energies: 0 (kept so every energy offers the same calls)."""
        return next(self.parameters()).new_zeros(())

    def initialize_from_data(self, z) -> None:
        """No data-dependent init (plain layers)."""

    @property
    def data_init_done(self) -> bool:
        """Always True: latent energies have no data-dependent init."""
        return True
