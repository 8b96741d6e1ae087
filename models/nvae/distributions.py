"""The diagonal Normal used for every NVAE latent group and for the Gaussian decoder.

Raw network outputs (μ, log σ) are soft-clamped to (−5, 5) with 5·tanh(·/5), and
σ = exp(log σ) + 0.01, so σ lies in about [0.0167, 148.4]. The +0.01 keeps σ away from 0: the
top-group prior N(0, log σ = 0) therefore has σ = 1.01, not 1. A temperature t multiplies σ and
leaves μ unchanged.
"""
from __future__ import annotations

import math

import torch

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def soft_clamp5(x: torch.Tensor) -> torch.Tensor:
    """5·tanh(x/5): a differentiable clamp to (−5, 5), ≈ identity near 0."""
    return 5.0 * torch.tanh(x / 5.0)


class Normal:
    """A diagonal Normal built from raw network outputs, any shape (typically [B, C, H, W]).

    Attributes: `mu` (soft-clamped mean), `sigma` (t·(exp(soft-clamped log σ) + 0.01)).
    """

    def __init__(self, mu: torch.Tensor, log_sigma: torch.Tensor, temperature: float = 1.0):
        self.mu = soft_clamp5(mu)
        self.sigma = torch.exp(soft_clamp5(log_sigma)) + 1e-2
        if temperature != 1.0:
            self.sigma = self.sigma * temperature

    @classmethod
    def from_params(cls, params: torch.Tensor, temperature: float = 1.0) -> "Normal":
        """Split [B, 2C, ...] network output into (μ, log σ) halves along dim 1.

        Computed in float32 even under autocast: KL and log-densities are sums over many terms.
        """
        mu, log_sigma = params.float().chunk(2, dim=1)
        return cls(mu, log_sigma, temperature)

    @classmethod
    def standard(cls, like: torch.Tensor, temperature: float = 1.0) -> "Normal":
        """The fixed top-group prior: raw μ = 0, raw log σ = 0, i.e. N(0, (1.01·t)²)."""
        zeros = torch.zeros_like(like)
        return cls(zeros, zeros, temperature)

    def sample_given_eps(self, eps: torch.Tensor) -> torch.Tensor:
        """The reparameterization z = μ + σ·ε."""
        return self.mu + self.sigma * eps

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = μ + σ·ε with fresh ε ~ N(0, I) (from `generator` when given)."""
        # randn_like, not randn(mu.shape): it traces under torch.compile with dynamic shapes. Contiguous, so
        # the numbers land where randn(mu.shape) puts them whatever mu's memory format (channels-last).
        eps = torch.randn_like(self.mu, generator=generator, memory_format=torch.contiguous_format)
        return self.sample_given_eps(eps)

    def eps_given_sample(self, z: torch.Tensor) -> torch.Tensor:
        """The inverse map ε = (z − μ)/σ."""
        return (z - self.mu) / self.sigma

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Element-wise log N(z; μ, σ²), same shape as z."""
        normalized = (z - self.mu) / self.sigma
        return -0.5 * normalized * normalized - torch.log(self.sigma) - _HALF_LOG_2PI

    def kl(self, other: "Normal") -> torch.Tensor:
        """Element-wise analytic KL(self ‖ other)."""
        mean_term = (self.mu - other.mu) / other.sigma
        ratio = self.sigma / other.sigma
        return 0.5 * (mean_term * mean_term + ratio * ratio) - 0.5 - torch.log(ratio)
