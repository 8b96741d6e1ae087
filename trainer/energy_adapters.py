"""Energy adapters: how each method turns noise ε into an energy for the one Langevin sampler.

The sampler (`trainer/langevin.py`) adds ½‖ε‖²; an adapter supplies the rest of U(ε). VAEBM moves
(ε_z, ε_x) and scores the decoder's sample x = μ_x(z) + t·σ_x(z)·ε_x with a pixel-space energy.
"""
from __future__ import annotations

from typing import Callable

import torch


class VAEBMEnergy:
    """U(ε) − ½‖ε‖² = E_ψ(T_θ(ε)) for VAEBM (paper Eq. 9). Noise layout: [ε_z1, …, ε_zL, ε_x].

    The decoder sample is not clamped to [−1, 1] (the official code clamps; the paper's potential
    does not), so every coordinate of ε_x keeps a gradient.
    """

    def __init__(self, vae, energy: Callable[[torch.Tensor], torch.Tensor], temperature: float = 1.0):
        self.vae, self.energy, self.temperature = vae, energy, temperature

    def __call__(self, noise: list[torch.Tensor]) -> torch.Tensor:
        generation = self.vae.decode(noise[:-1], noise[-1], temperature=self.temperature)
        return self.energy(generation.x_sample)

    def images(self, noise: list[torch.Tensor], use_mean: bool) -> torch.Tensor:
        """The images [B, C, H, W] that noise decodes to: the decoder mean, or the sample."""
        generation = self.vae.decode(noise[:-1], noise[-1], temperature=self.temperature)
        return generation.x_mean if use_mean else generation.x_sample

    def initial_noise(self, batch: int, generator: torch.Generator, device) -> list[torch.Tensor]:
        shapes = [*self.vae.latent_shapes, self.vae.image_shape]
        return [torch.randn((batch, *shape), generator=generator, device=device) for shape in shapes]
