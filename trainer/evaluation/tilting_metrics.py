"""Metrics of the latent-tilting experiment: the tilted model's log-likelihood and toy sample quality.

The tilted model (exponential tilting paper, §3.2, Eq. 6) over a VAE with prior p(z), decoder p(x|z)
and decoder mean G(z):

    p_tilt(z) = p(z) · exp(−E(G(z))) / Z,     Z = E_{z~p(z)}[exp(−E(G(z)))],     x ~ p(x|z).

Its data density p_tilt(x) = ∫ p_tilt(z) p(x|z) dz is estimated by importance sampling with the VAE's
encoder q(z|x) as the proposal (IWAE with the tilt inside the weight):

    log p_tilt(x) ≈ log (1/K) Σ_k p(x|z_k) p(z_k) exp(−E(G(z_k))) / q(z_k|x)  −  log Z,    z_k ~ q(z|x),

and log Z by Monte Carlo over prior draws (`toy_metrics.log_partition_from_base_samples`). The same K
draws give the base VAE's IWAE estimate, so the two numbers share their proposal noise.

Toy sample quality:
- 25-Gaussians: a sample is "high quality" within 3 component std of the nearest mode
  (`toy_likelihood.near_mode_fraction`); a mode is covered when it holds at least `min_share` of its
  fair share (N/25) of such samples (`modes_covered`).
- Swiss roll: a sample is high quality within 3 × the data noise of the noiseless roll curve
  (`distance_to_curve`); its exact density is a 1-D integral over the curve (`swiss_roll_log_prob`).
"""
from __future__ import annotations

import math

import torch

from data.toy2d import Gaussians25

# The Swiss roll of data/toy2d.SwissRoll: c(t) = t·(cos t, sin t)/5 with t uniform on [1.5π, 4.5π].
ROLL_T_MIN, ROLL_T_MAX, ROLL_SCALE = 1.5 * math.pi, 4.5 * math.pi, 5.0


@torch.no_grad()
def tilted_iwae(vae, energy, x: torch.Tensor, samples: int, generator: torch.Generator | None = None,
                block: int = 65_536) -> tuple[torch.Tensor, torch.Tensor]:
    """IWAE estimates of the base and the (unnormalized) tilted log-density of points x [B, D].

    `vae` is a one-latent-group Gaussian VAE with a N(0, I) prior (`models.mlp_vae.MLPVAE`: `encode`,
    `decode_params`); `energy` maps decoder means [N, D] to energies [N]. Returns float64 tensors [B]:
    (log p_vae(x), log p_vae,tilt(x) + log Z), i.e. subtract log Z from the second to normalize it.
    The K = `samples` posterior draws go through decoder and energy in chunks of about `block` pairs.
    """
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    mu_q, log_sigma_q = vae.encode(x)  # [B, L] each
    q = torch.distributions.Normal(mu_q, log_sigma_q.exp())
    prior = torch.distributions.Normal(0.0, 1.0)
    chunk = max(1, block // x.shape[0])
    base_parts, tilt_parts = [], []  # logsumexp over each chunk of draws, [B] each
    for start in range(0, samples, chunk):
        k = min(chunk, samples - start)
        eps = torch.randn((k, *mu_q.shape), generator=generator, dtype=mu_q.dtype)
        z = mu_q + log_sigma_q.exp() * eps  # [k, B, L]
        x_mean, x_log_sigma = vae.decode_params(z)  # [k, B, D]
        log_px_z = torch.distributions.Normal(x_mean, x_log_sigma.exp()).log_prob(x).sum(-1)
        log_w = (log_px_z + prior.log_prob(z).sum(-1) - q.log_prob(z).sum(-1)).double()  # [k, B]
        energies = energy(x_mean.reshape(k * x.shape[0], -1)).reshape(k, x.shape[0]).double()
        base_parts.append(torch.logsumexp(log_w, dim=0))
        tilt_parts.append(torch.logsumexp(log_w - energies, dim=0))
    log_k = math.log(samples)
    return (torch.logsumexp(torch.stack(base_parts), 0) - log_k,
            torch.logsumexp(torch.stack(tilt_parts), 0) - log_k)


@torch.no_grad()
def prior_energies(vae, energy, n: int, generator: torch.Generator | None = None,
                   block: int = 65_536) -> tuple[torch.Tensor, torch.Tensor]:
    """n prior draws ε_z ~ N(0, I) [n, L] (z = ε_z at temperature 1) and their energies E(G(z)) [n]."""
    latent_dim = vae.latent_shapes[0][0]
    eps = torch.randn((n, latent_dim), generator=generator)
    energies = torch.cat([energy(vae.decode([chunk]).x_mean) for chunk in eps.split(block)])
    return eps, energies


def roll_curve(points: int = 20_000) -> torch.Tensor:
    """The noiseless Swiss roll c(t) at `points` evenly spaced t: [points, 2] float64."""
    t = torch.linspace(ROLL_T_MIN, ROLL_T_MAX, points, dtype=torch.float64)
    return torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1) / ROLL_SCALE


def distance_to_curve(points: torch.Tensor, curve: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Euclidean distance [N] (float64) of each point [N, 2] to the nearest vertex of a dense curve [T, 2].

    With the default 20,000 vertices neighbours are at most 1.4e-3 apart, so this overestimates the
    distance to the continuous curve by under 7e-4.
    """
    points = points.double()
    return torch.cat([torch.cdist(chunk, curve).min(dim=1).values for chunk in points.split(block)])


def swiss_roll_log_prob(points: torch.Tensor, noise: float, t_points: int = 6_000, block: int = 256) -> torch.Tensor:
    """Exact log-density [N] (float64) of the noisy Swiss roll at points [N, 2]:

        p(x) = (1 / 3π) ∫ N(x; c(t), noise² I) dt   over t ∈ [1.5π, 4.5π],

    by the midpoint rule on `t_points` cells (the mean over the cell centres). At the default 6,000 cells
    neighbouring centres lie at most 1.5e-3 apart along the curve, 1/30 of the data noise 0.05.
    """
    if noise <= 0:
        raise ValueError(f"the Swiss roll density needs noise > 0, got {noise}")
    width = (ROLL_T_MAX - ROLL_T_MIN) / t_points
    t = ROLL_T_MIN + width * (torch.arange(t_points, dtype=torch.float64) + 0.5)
    centres = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1) / ROLL_SCALE  # [T, 2]
    log_norm = -math.log(2 * math.pi * noise ** 2)
    out = []
    for chunk in points.double().split(block):
        sq = torch.cdist(chunk, centres).square()  # [b, T]
        out.append(torch.logsumexp(-0.5 * sq / noise ** 2, dim=1) + log_norm - math.log(t_points))
    return torch.cat(out)


def mode_counts(truth: Gaussians25, points: torch.Tensor) -> torch.Tensor:
    """How many points [N, 2] lie within 3 std of each of the 25 modes: [25] int64."""
    distance = torch.cdist(points.double(), truth.means)  # [N, 25]
    nearest = distance.min(dim=1)
    near = nearest.values < 3 * truth.std
    return torch.bincount(nearest.indices[near], minlength=len(truth.means))


def modes_covered(truth: Gaussians25, points: torch.Tensor, min_share: float = 0.1) -> int:
    """Modes holding at least `min_share` × N/25 of the N points within 3 std of them (at least one point)."""
    counts = mode_counts(truth, points)
    needed = max(1.0, min_share * points.shape[0] / len(truth.means))
    return int((counts >= needed).sum())
