"""The VampPrior (Tomczak & Welling 2018, §3): a prior that is a mixture of the encoder's own posteriors.

    p(z) = (1/K) Σ_k q(z | u_k),      log p(z) = logsumexp_k log q(z | u_k) − log K

with K learnable pseudo-inputs u_k that live in the data space and go through the same encoder as the
data. `VampPrior` holds the pseudo-inputs; the model that owns the encoder computes the components
q(z | u_k) = N(μ_k, σ_k²) and hands them to the pure functions below.

Noise ↔ latent map (README, Design: every generator is a deterministic map of standard-normal noise). A draw
from the mixture needs a component and a point of it, so a VampPrior latent has two noise tensors:

    k = ⌊Φ(ε_k)·K⌋  (ε_k [B, 1], Φ the normal CDF, so k is uniform on 0..K−1)
    z = μ_k + t·σ_k·ε_z

which is an exact sample of the mixture (at temperature t = 1). The inverse is not unique (any k would
do); `invert` picks the component most responsible for z and the midpoint of its interval,
ε_k = Φ⁻¹((k + ½)/K), so decoding the inverse gives z back exactly. The map is piecewise constant in
ε_k, so gradients with respect to ε_k do not exist and noise-space Langevin cannot move it. The models
with a VampPrior (the NVAE's top group, `models/nvae/model.py`; the VAE/HVAE of `models/hvae.py`) declare
ε_k as `held_noise`: each chain keeps its component and Langevin moves the rest of ε
(`models.langevin.langevin`, `held`); a caller that would move ε_k is refused (`sample` below).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from models.configs import PSEUDO_INITS  # noqa: F401 (re-exported)

_LOG_2PI = math.log(2.0 * math.pi)


class VampPrior(nn.Module):
    """K pseudo-inputs u_k of shape `input_shape`, each inside the open interval (low, high).

    Stored as unconstrained parameters r and squashed, u = low + (high − low)·sigmoid(r), so a gradient
    step can never push a pseudo-input outside the data range (the encoder never saw such inputs).
    `init="noise"`: r ~ N(0, 1) (u spread around the middle of the range); `init="data"`: the same
    noise until the trainer calls `initialize_from` with K random training images.
    """

    def __init__(self, num_components: int, input_shape: tuple[int, ...], init: str = "data",
                 value_range: tuple[float, float] = (0.0, 1.0)):
        super().__init__()
        if num_components < 1:
            raise ValueError(f"pseudo_inputs must be >= 1, got {num_components}")
        if init not in PSEUDO_INITS:
            raise ValueError(f"pseudo_init must be one of {', '.join(PSEUDO_INITS)}, got {init!r}")
        self.num_components, self.init, self.value_range = num_components, init, value_range
        self.raw = nn.Parameter(torch.randn(num_components, *input_shape))

    def pseudo_inputs(self) -> torch.Tensor:
        """u [K, *input_shape] in (low, high); differentiable in the parameters."""
        low, high = self.value_range
        return low + (high - low) * torch.sigmoid(self.raw)

    @torch.no_grad()
    def initialize_from(self, values: torch.Tensor, margin: float = 0.02) -> None:
        """Set u_k = values[k] ([K, *input_shape] in the value range), pulled `margin` (a fraction of the
        range) inside it so the inverse sigmoid stays finite."""
        if values.shape != self.raw.shape:
            raise ValueError(f"expected pseudo-input values of shape {tuple(self.raw.shape)}, got {tuple(values.shape)}")
        low, high = self.value_range
        unit = ((values.to(self.raw) - low) / (high - low)).clamp(margin, 1.0 - margin)
        self.raw.copy_(torch.log(unit) - torch.log1p(-unit))


# ----------------------------------------------------------------------------------------------
# The mixture density, as pure functions of the components (μ_k, σ_k) [K, M] and latents z [N, M].


def component_log_probs(z: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """log N(z_n; μ_k, diag σ_k²) summed over the M dimensions: [N, K] for z [N, M], μ and σ [K, M]."""
    normalized = (z[:, None, :] - mu[None]) / sigma[None]  # [N, K, M]
    return (-0.5 * normalized * normalized).sum(-1) - torch.log(sigma).sum(-1) - 0.5 * mu.shape[-1] * _LOG_2PI


def mixture_log_prob(z: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, chunk: int = 1 << 22) -> torch.Tensor:
    """log (1/K) Σ_k N(z; μ_k, σ_k²) [N] for z [N, M]; rows go in chunks of about `chunk` (n, k, m) terms."""
    rows = max(1, chunk // (mu.shape[0] * mu.shape[1]))
    parts = [torch.logsumexp(component_log_probs(part, mu, sigma), dim=1) for part in z.split(rows)]
    return torch.cat(parts) - math.log(mu.shape[0])


def marginal_log_probs(z: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per dimension d, log (1/K) Σ_k N(z_d; μ_kd, σ_kd²): the log-density of the mixture's 1-D marginal, [N, M].

    A mixture does not factorize over dimensions, so its KL has no per-dimension split; the KL between
    1-D marginals, log q(z_d|x) − log p(z_d), is the per-unit diagnostic (active units) instead.
    """
    normalized = (z[:, None, :] - mu[None]) / sigma[None]  # [N, K, M]
    per_component = -0.5 * normalized * normalized - torch.log(sigma)[None] - 0.5 * _LOG_2PI
    return torch.logsumexp(per_component, dim=1) - math.log(mu.shape[0])


# ----------------------------------------------------------------------------------------------
# The noise ↔ latent map (see the module docstring).


def select_component(eps_k: torch.Tensor, num_components: int) -> torch.Tensor:
    """k = ⌊Φ(ε_k)·K⌋ [N] (long) for the selector noise ε_k [N, 1]."""
    uniform = torch.special.ndtr(eps_k[:, 0].double())
    return (uniform * num_components).long().clamp(0, num_components - 1)


def selector_noise(k: torch.Tensor, num_components: int, like: torch.Tensor) -> torch.Tensor:
    """ε_k = Φ⁻¹((k + ½)/K) [N, 1], the middle of component k's interval (dtype and device of `like`)."""
    return torch.special.ndtri((k.double() + 0.5) / num_components)[:, None].to(like)


def sample(eps_z: torch.Tensor, eps_k: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor,
           temperature: float = 1.0) -> torch.Tensor:
    """z = μ_k + t·σ_k·ε_z [N, M] with k = select_component(ε_k).

    Refuses an ε_k that is a leaf requiring gradients (the noise of a Langevin chain that moves it): z
    does not depend smoothly on it. Works for any per-component shape: μ, σ [K, ...] and ε_z [N, ...].
    """
    if eps_k.requires_grad and eps_k.is_leaf:  # what Langevin differentiates
        raise ValueError("a VampPrior sample is piecewise constant in its component noise ε_k, so noise-space "
                         "Langevin cannot move it: hold it fixed (langevin(..., held=...), automatic for models "
                         "that declare held_noise) or use a model with prior=standard")
    k = select_component(eps_k, mu.shape[0])
    return mu[k] + temperature * sigma[k] * eps_z


def invert(z: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor,
           temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ε_z [N, M], ε_k [N, 1]) with sample(ε_z, ε_k, μ, σ, t) = z: the most responsible component of z."""
    k = component_log_probs(z.detach(), mu.detach(), temperature * sigma.detach()).argmax(dim=1)
    return (z - mu[k]) / (temperature * sigma[k]), selector_noise(k, mu.shape[0], z)
