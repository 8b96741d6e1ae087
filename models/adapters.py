"""Energy adapters: how each energy method of our papers turns noise ε into an energy for the one
Langevin sampler (`models/langevin.py`), which adds ½‖ε‖² itself (README, Design).

Every generator is a map T(ε) from standard-normal noise ε = (ε_z1 … ε_zL, ε_x) to (z, x); every method
is an energy on part of T(ε):

| method          | Langevin moves  | the energy scores                    | positives             |
|-----------------|-----------------|--------------------------------------|-----------------------|
| vaebm           | ε_z and ε_x     | x = μ_x(z) + t·σ_x(z)·ε_x (pixels)   | data x                |
| latent-tilting  | ε_z             | G(z) = μ_x(z), the decoder mean      | data x                |
| joint-prior     | ε_z             | the latents z = (z_1 … z_L)          | z ~ q(z|x) (encoder)  |

An adapter offers the same calls for all three, so the EBM training loop (`trainer/ebm/loop.py`),
the bundle sampler (`models/sampler.py`) and the benchmarks never branch on the method:

    chain_shapes                     per-sample shapes of the noise of a chain
    held_noise                       indices into chain_shapes that Langevin carries unchanged (a VampPrior
                                     top group's component selector ε_k: each chain keeps its component)
    adapter(noise) -> [B]            E(part of T(noise)), the potential minus ½‖ε‖²
    negatives(noise, use_mean)       what the energy scores for Langevin samples (no gradient)
    positives(x, posterior_eps)      what the energy scores for a data batch x (posterior noise: joint prior)
    images(noise)                    decoder means [B, C, H, W] (or points [B, D]) of the chains
    latent_noise(noise)              the ε_z part (what the replay buffer stores)
    chain_noise(eps_z, generator)    chains from stored ε_z (VAEBM adds fresh ε_x)
    concat(a, b)                     two energy inputs as one batch (one forward pass under DDP)
"""
from __future__ import annotations

from typing import Callable

import torch

from models.configs import METHODS

Noise = list[torch.Tensor]
EnergyInput = torch.Tensor | list[torch.Tensor]


class NoiseEnergy:
    """Shared plumbing; subclasses define what is moved and what is scored."""

    method = ""
    moves_eps_x = False
    positives_need_noise = False  # True: `positives` samples z ~ q(z|x) with the posterior noise it is given

    def __init__(self, vae, energy: Callable[[EnergyInput], torch.Tensor], temperature: float = 1.0):
        self.vae, self.energy, self.temperature = vae, energy, temperature

    @property
    def chain_shapes(self) -> list[tuple[int, ...]]:
        """Per-sample shapes of the chains' noise: the VAE's latent shapes, plus the image shape if ε_x moves."""
        shapes = [tuple(s) for s in self.vae.latent_shapes]
        return [*shapes, tuple(self.vae.image_shape)] if self.moves_eps_x else shapes

    @property
    def held_noise(self) -> tuple[int, ...]:
        """Indices into `chain_shapes` that `models.langevin.langevin` must not move (it reads this
        attribute): the VAE's own `held_noise` (indices into its `latent_shapes`, which come first)."""
        return tuple(getattr(self.vae, "held_noise", ()))

    def latent_noise(self, noise: Noise) -> Noise:
        """The latent part ε_z of chain noise (drops ε_x where the chains carry it)."""
        return list(noise[:-1]) if self.moves_eps_x else list(noise)

    def chain_noise(self, eps_z: Noise, generator: torch.Generator) -> Noise:
        """Chain noise from ε_z (each [B, ...]): ε_z, plus a fresh ε_x [B, C, H, W] where the chains move it."""
        if not self.moves_eps_x:
            return list(eps_z)
        eps_x = torch.randn((eps_z[0].shape[0], *self.vae.image_shape), generator=generator, device=generator.device)
        return [*eps_z, eps_x]

    def initial_noise(self, batch: int, generator: torch.Generator, device) -> Noise:
        """Fresh chains: standard-normal noise of `chain_shapes`."""
        return [torch.randn((batch, *shape), generator=generator, device=device) for shape in self.chain_shapes]

    def images(self, noise: Noise) -> torch.Tensor:
        """Decoder means μ_x(z(ε_z)) [B, C, H, W] of the chains (ε_x does not change the mean)."""
        return self.vae.decode(self.latent_noise(noise), None, self.temperature).x_mean

    def positives(self, x: torch.Tensor, posterior_eps: Noise | None = None) -> EnergyInput:
        """What the energy scores for data x [B, ...]: x itself (the joint prior overrides this)."""
        return x

    @staticmethod
    def concat(a: EnergyInput, b: EnergyInput) -> EnergyInput:
        """Concatenate two energy inputs along the batch: tensors, or lists of per-group tensors."""
        if isinstance(a, torch.Tensor):
            return torch.cat([a, b])
        return [torch.cat([u, v]) for u, v in zip(a, b)]

    @staticmethod
    def split(inputs: EnergyInput, batch: int) -> tuple[EnergyInput, EnergyInput]:
        """Undo `concat` for the first `batch` rows."""
        if isinstance(inputs, torch.Tensor):
            return inputs[:batch], inputs[batch:]
        return [t[:batch] for t in inputs], [t[batch:] for t in inputs]


class VAEBMEnergy(NoiseEnergy):
    """VAEBM (paper Eq. 9): U(ε) − ½‖ε‖² = E_ψ(T_θ(ε)), the decoder SAMPLE x = μ_x + t·σ_x·ε_x.

    The sample is not clamped to [−1, 1] (the official code clamps; the paper's potential does not),
    so every coordinate of ε_x keeps a gradient.
    """

    method = "vaebm"
    moves_eps_x = True

    def __call__(self, noise: Noise) -> torch.Tensor:
        return self.energy(self.vae.decode(noise[:-1], noise[-1], self.temperature).x_sample)

    def negatives(self, noise: Noise, use_mean: bool = False) -> torch.Tensor:
        """Negatives of chain noise: decoder samples x [B, C, H, W] (decoder means with `use_mean`)."""
        generation = self.vae.decode(noise[:-1], noise[-1], self.temperature)
        return generation.x_mean if use_mean else generation.x_sample


class LatentTiltEnergy(NoiseEnergy):
    """Latent-space tilting (exponential tilting paper, Eq. 6): p(z) ∝ p(z)·exp(−E_ψ(G(z))) with G the
    decoder mean. Langevin moves ε_z only; in ε-space the prior term is exactly ½‖ε‖² because z is an
    invertible (triangular) map of ε_z at fixed temperature (README, Design)."""

    method = "latent-tilting"

    def __call__(self, noise: Noise) -> torch.Tensor:
        return self.energy(self.vae.decode(list(noise), None, self.temperature).x_mean)

    def negatives(self, noise: Noise, use_mean: bool = True) -> torch.Tensor:
        """Negatives of chain noise ε_z: decoder means μ_x [B, C, H, W] (always the mean)."""
        return self.vae.decode(list(noise), None, self.temperature).x_mean


class JointPriorEnergy(NoiseEnergy):
    """Joint latent EBM prior (Cui, Wu & Han 2023): p(z) ∝ exp(Σ_l f_l(z_l) + f_joint(z))·p_hier(z). The
    energy scores the latents z = T_z(ε_z) (`models/latent_energy.py`); positives are z ~ q(z|x)."""

    method = "joint-prior"
    positives_need_noise = True

    def __call__(self, noise: Noise) -> torch.Tensor:
        return self.energy(self.vae.decode(list(noise), None, self.temperature).z)

    def negatives(self, noise: Noise, use_mean: bool = False) -> list[torch.Tensor]:
        """Negatives of chain noise ε_z: the latents z, one [B, C_l, h_l, w_l] tensor per group."""
        return self.vae.decode(list(noise), None, self.temperature).z

    def positives(self, x: torch.Tensor, posterior_eps: Noise | None = None) -> list[torch.Tensor]:
        """z ~ q(z|x) with the given standard-normal posterior noise (L × [B, *latent_shape]; None: fresh),
        mapped through the prior's reparameterization, so positives and negatives are the same function of
        ε_z (exact: `decode(posterior_noise(x)).z` is the posterior z)."""
        if posterior_eps is None:
            posterior_eps = [torch.randn((x.shape[0], *shape), device=x.device) for shape in self.vae.latent_shapes]
        eps_z, _, _ = self.vae.posterior_noise(x, posterior_eps, self.temperature)
        return self.vae.decode(eps_z, None, self.temperature).z


ADAPTERS = {cls.method: cls for cls in (VAEBMEnergy, LatentTiltEnergy, JointPriorEnergy)}


def build_adapter(method: str, vae, energy: Callable[[EnergyInput], torch.Tensor],
                  temperature: float = 1.0) -> NoiseEnergy:
    """The adapter of `method` (one of METHODS) over a frozen VAE and an energy network."""
    if method not in ADAPTERS:
        raise ValueError(f"unknown energy method {method!r}; expected one of {', '.join(METHODS)}")
    return ADAPTERS[method](vae, energy, temperature)

