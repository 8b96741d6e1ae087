"""A small fully-connected VAE for vector data [B, D]: the toy-scale stand-in for the NVAE.

VAEBM §5.4 (25-Gaussians): encoder and decoder of 4 fully-connected layers of 256 units, a 20-d
latent. Here each network is `depth` × (Linear → activation) followed by a linear head, like
`models.energy.MLPEnergy`:

    encoder   x [B, D] → MLP → (μ_q, log σ_q) [B, L] each          q(z|x) = N(μ_q, σ_q²)
    prior     p(z) = N(0, I)                                       one latent group, z ∈ R^L
    decoder   z [B, L] → MLP → (μ_x, log σ_x) [B, D] each          p(x|z) = N(μ_x, σ_x²)

The decoder predicts a per-dimension σ_x, floored smoothly at exp(min_log_sigma):
log σ_x = m + softplus(raw − m), so the model can become as sharp as the 25-Gaussians need while
log σ_x never drops below m (−7 → σ_x ≥ 9·10⁻⁴) and keeps a gradient everywhere.

As a generator it is the deterministic map of standard-normal noise of README, Design, at temperature t:
z = t·ε_z, x = μ_x(z) + t·σ_x(z)·ε_x. The public API (`forward`, `decode`, `encode_noise`,
`latents_to_noise`, `sample`, `latent_shapes`, `image_shape`, `spectral_loss`, `bn_loss`, …) has the
names and semantics of `models.nvae.model.NVAE`, so the trainers use either model unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.configs import ACTIVATION_NAMES, MLPVAEConfig
from models.nvae.model import Generation, NVAEOutput

_LOG_2PI = math.log(2.0 * math.pi)
ACTIVATIONS = dict(zip(ACTIVATION_NAMES, (nn.SiLU, nn.ReLU, nn.ELU, nn.Tanh)))  # swish, relu, elu, tanh


def _mlp(in_dim: int, out_dim: int, hidden: int, depth: int, activation: str) -> nn.Sequential:
    """depth × (Linear → activation), then Linear(hidden, out_dim)."""
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), ACTIVATIONS[activation]()]
        width = hidden
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


def _gaussian_log_prob(x: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """Element-wise log N(x; μ, σ²) with σ = exp(log σ)."""
    normalized = (x - mu) * torch.exp(-log_sigma)
    return -0.5 * normalized * normalized - log_sigma - 0.5 * _LOG_2PI


class MLPVAE(nn.Module):
    """Gaussian MLP VAE with one latent group and a fixed N(0, I) prior; see the module docstring."""

    def __init__(self, cfg: MLPVAEConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.encoder = _mlp(cfg.data_dim, 2 * cfg.latent_dim, cfg.hidden, cfg.depth, cfg.activation)
        self.decoder = _mlp(cfg.latent_dim, 2 * cfg.data_dim, cfg.hidden, cfg.depth, cfg.activation)
        self.gradient_checkpointing = False  # accepted for NVAE compatibility; nothing to checkpoint
        self.num_groups = 1
        self.groups_per_scale_decoder_order = [1]

    # ------------------------------------------------------------------------------------------
    # Shapes (names as in NVAE).

    @property
    def latent_shapes(self) -> list[tuple[int]]:
        """[(L,)]: one latent group."""
        return [(self.cfg.latent_dim,)]

    @property
    def z_shapes(self) -> list[tuple[int]]:
        """Shapes of the latents z themselves: the same as `latent_shapes`."""
        return self.latent_shapes

    @property
    def image_shape(self) -> tuple[int]:
        """(D,): the shape of one data vector (named as in NVAE for the trainers)."""
        return (self.cfg.data_dim,)

    # ------------------------------------------------------------------------------------------
    # The two networks.

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, D] → (μ_q, log σ_q) of q(z|x), each [B, L]."""
        mu, log_sigma = self.encoder(x).chunk(2, dim=-1)
        return mu, log_sigma

    def decode_params(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z [..., L] → (μ_x, log σ_x) of p(x|z), each [..., D]; log σ_x softly floored at min_log_sigma."""
        mu, raw = self.decoder(z).chunk(2, dim=-1)
        floor = self.cfg.min_log_sigma
        return mu, floor + F.softplus(raw - floor)

    # ------------------------------------------------------------------------------------------
    # Public passes (as in NVAE).

    def forward(self, x: torch.Tensor) -> NVAEOutput:
        """Training pass: x [B, D] → reconstruction log-density [B] and analytic KL(q‖p) [B]."""
        mu_q, log_sigma_q = self.encode(x)
        z = mu_q + torch.exp(log_sigma_q) * torch.randn_like(mu_q)
        kl = 0.5 * (mu_q * mu_q + torch.exp(2 * log_sigma_q) - 1.0) - log_sigma_q  # [B, L]
        x_mean, x_log_sigma = self.decode_params(z)
        return NVAEOutput(
            x_mean=x_mean,
            x_log_sigma=x_log_sigma,
            recon_log_prob=_gaussian_log_prob(x, x_mean, x_log_sigma).sum(dim=-1),
            kl_per_group=[kl.sum(dim=-1)],
            kl_per_channel=[kl.mean(dim=0)],
            z=[z],
        )

    def decode(
        self, eps_z: list[torch.Tensor], eps_x: torch.Tensor | None = None, temperature: float = 1.0
    ) -> Generation:
        """ε → (z, x): z = t·ε_z, x = μ_x(z) + t·σ_x(z)·ε_x. eps_z: [ [B, L] ], eps_x: [B, D] or None.

        Differentiable in the ε's. `x_log_sigma` is log σ_x at temperature 1; `x_sample` is None
        without ε_x.
        """
        if len(eps_z) != 1:
            raise ValueError(f"decode expects 1 noise tensor, got {len(eps_z)}")
        z = temperature * eps_z[0]
        x_mean, x_log_sigma = self.decode_params(z)
        x_sample = None if eps_x is None else x_mean + temperature * torch.exp(x_log_sigma) * eps_x
        return Generation(z=[z], x_mean=x_mean, x_log_sigma=x_log_sigma, x_sample=x_sample)

    def encode_noise(
        self, x: torch.Tensor, temperature: float = 1.0, sample: bool = True, generator: torch.Generator | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x [B, D] → ([ε_z [B, L]], ε_x [B, D]), the inverse of `decode` at `temperature`.

        z ~ q(z|x) (μ_q when sample=False), ε_z = z/t, ε_x = (x − μ_x(z))/(t·σ_x(z)).
        """
        mu_q, log_sigma_q = self.encode(x)
        z = mu_q
        if sample:
            noise = torch.randn(mu_q.shape, generator=generator, device=mu_q.device, dtype=mu_q.dtype)
            z = mu_q + torch.exp(log_sigma_q) * noise
        return self.latents_to_noise([z], x, temperature)

    def posterior_noise(
        self, x: torch.Tensor, posterior_eps: list[torch.Tensor], temperature: float = 1.0
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """(ε_z, ε_x, log w) along z = μ_q + σ_q·posterior_eps[0]; log w = log p(x|z) + log p(z) − log q(z|x)
        [B] at temperature 1 (an importance weight). Same contract as `NVAE.posterior_noise`."""
        mu_q, log_sigma_q = self.encode(x)
        z = mu_q + torch.exp(log_sigma_q) * posterior_eps[0]
        eps_z, eps_x = self.latents_to_noise([z], x, temperature)
        x_mean, x_log_sigma = self.decode_params(z)
        half_log_2pi = 0.5 * math.log(2 * math.pi)
        log_px_z = (-0.5 * ((x - x_mean) * torch.exp(-x_log_sigma)) ** 2 - x_log_sigma - half_log_2pi).sum(-1)
        log_pz = (-0.5 * z * z - half_log_2pi).sum(-1)
        log_qz = (-0.5 * posterior_eps[0] * posterior_eps[0] - log_sigma_q - half_log_2pi).sum(-1)
        return eps_z, eps_x, log_px_z + log_pz - log_qz

    def prior_log_prob(self, z: list[torch.Tensor]) -> torch.Tensor:
        """log p(z) [B] of given latents [[B, L]]: the standard normal (it has no parameters)."""
        return (-0.5 * z[0] * z[0] - 0.5 * math.log(2 * math.pi)).sum(-1)

    def latents_to_noise(
        self, z: list[torch.Tensor], x: torch.Tensor | None = None, temperature: float = 1.0
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """([z [B, L]], x [B, D] or None) → ([ε_z], ε_x or None) with decode(ε_z, ε_x, t) = (z, x)."""
        eps_z = [z[0] / temperature]
        if x is None:
            return eps_z, None
        x_mean, x_log_sigma = self.decode_params(z[0])
        return eps_z, (x - x_mean) * torch.exp(-x_log_sigma) / temperature

    def sample(
        self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Generation:
        """Draw ε ~ N(0, I) (with `generator`) and `decode` them at `temperature`."""
        param = next(self.parameters())
        device = param.device if device is None else torch.device(device)
        eps_z = torch.randn((n, self.cfg.latent_dim), generator=generator, device=device, dtype=param.dtype)
        eps_x = torch.randn((n, self.cfg.data_dim), generator=generator, device=device, dtype=param.dtype)
        return self.decode([eps_z], eps_x, temperature)

    # ------------------------------------------------------------------------------------------
    # Evaluation.

    @torch.no_grad()
    def log_likelihood(
        self, x: torch.Tensor, num_samples: int, batch: int = 65536, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Importance-weighted estimate of log p(x) [B] (Burda et al. 2015), x [B, D]:

            log p(x) ≈ log (1/K) Σ_k exp(log p(x|z_k) + log p(z_k) − log q(z_k|x)),  z_k ~ q(z|x).

        A lower bound in expectation, equal to the ELBO's estimate at K = 1 and tightening as K grows.
        The K samples go through the decoder in chunks of about `batch` (x, z) pairs, so K in the
        thousands fits in memory. No gradients.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}")
        mu_q, log_sigma_q = self.encode(x)  # [B, L]
        chunk = max(1, batch // x.shape[0])
        partial = []  # logsumexp over each chunk of samples, [B] each
        for start in range(0, num_samples, chunk):
            k = min(chunk, num_samples - start)
            eps = torch.randn((k, *mu_q.shape), generator=generator, device=mu_q.device, dtype=mu_q.dtype)
            z = mu_q + torch.exp(log_sigma_q) * eps  # [k, B, L]
            x_mean, x_log_sigma = self.decode_params(z)  # [k, B, D]
            log_px_z = _gaussian_log_prob(x, x_mean, x_log_sigma).sum(dim=-1)
            log_pz = (-0.5 * z * z - 0.5 * _LOG_2PI).sum(dim=-1)
            log_qz = (-0.5 * eps * eps - log_sigma_q - 0.5 * _LOG_2PI).sum(dim=-1)
            partial.append(torch.logsumexp(log_px_z + log_pz - log_qz, dim=0))
        return torch.logsumexp(torch.stack(partial), dim=0) - math.log(num_samples)

    # ------------------------------------------------------------------------------------------
    # Regularizers: no convs and no BN, so both are 0 and the NVAE loss code runs unchanged.

    def spectral_loss(self) -> torch.Tensor:
        """No spectral penalty for this VAE: 0 (kept so every VAE offers the same calls)."""
        return next(self.parameters()).new_zeros(())

    def bn_loss(self) -> torch.Tensor:
        """No BN penalty for this VAE: 0 (kept so every VAE offers the same calls)."""
        return next(self.parameters()).new_zeros(())
