"""Where an energy iteration's negatives come from (`trainer/ebm/loop.py` calls `negative_samples`).

Langevin chains in the VAE's noise space (VAEBM §3.2): the initial noise is ε_z from the replay buffer with
probability p or fresh (a share of the fresh chains started in the prior's tails with `langevin.tail_fraction`,
the other fresh chains from prior draws resampled by exp(−E) with `langevin.start_pool`), ε_x fresh; K steps of
the one sampler (`models/langevin.py`); the negatives are what the energy scores of the final noise. For 2-D toys
`langevin.negatives: resample` replaces the chains by exact draws from h (importance resampling), the
reference trainer of README, "25-Gaussians".
"""
from __future__ import annotations

import torch

from models.adapters import NoiseEnergy
from models.langevin import LangevinResult, langevin
from trainer.ebm.replay import ReplayBuffer
from trainer.run.collective import BatchRows, SlicedNoise


def negative_samples(adapter: NoiseEnergy, buffer: ReplayBuffer | None, batch: int, p: float,
                     generator: torch.Generator, langevin_cfg, autocast_dtype=None,
                     rows: BatchRows | None = None):
    """Initial noise (ε_z from the buffer with probability p, else fresh; ε_x, where the method moves it,
    always fresh), K Langevin steps, and the negatives: what the energy scores of the final noise (for
    VAEBM x− [B, C, H, W], the decoder mean with `use_mu_cd`, else the sample).

    `rows`: this process's chains of the global micro-batch (data.split=global); fresh and Langevin noise
    are drawn for all `rows.total` chains and sliced. Default: the `batch` chains are this process's own.
    """
    device = generator.device
    rows = rows or BatchRows(0, batch, batch)
    if langevin_cfg.negatives == "resample":
        return resampled_negatives(adapter, batch, langevin_cfg.resample_pool, generator)
    pool, start_ess = langevin_cfg.start_pool, None
    if buffer is not None:  # per-process entries: these chains depend on the number of processes
        eps_z, replayed = buffer.draw(batch, p, generator, device)
        noise = adapter.chain_noise(eps_z, generator)
        if pool > 1 and replayed < batch:  # the fresh chains come last
            fresh, start_ess = resampled_starts(adapter, batch - replayed, pool, generator)
            noise = [torch.cat([n[:replayed], f]) for n, f in zip(noise, fresh)]
    else:
        tail = round(langevin_cfg.tail_fraction * rows.total)
        if pool > 1:  # resampled from one global pool, so that every process draws the same starts
            noise, start_ess = resampled_starts(adapter, rows.total - tail, pool, generator)
            if tail:  # the tail chains come first and start from plain draws, widened below
                plain = adapter.initial_noise(tail, generator, device)
                noise = [torch.cat([t, n]) for t, n in zip(plain, noise)]
        else:
            noise = adapter.initial_noise(rows.total, generator, device)
        noise = [n[rows.start:rows.stop] for n in noise]
        noise = start_in_the_tails(adapter, noise, rows, langevin_cfg.tail_fraction, langevin_cfg.tail_std)
    chains = langevin(noise, adapter, langevin_cfg.steps, langevin_cfg.step_size,
                      SlicedNoise(generator, rows), autocast_dtype=autocast_dtype,
                      metropolis=langevin_cfg.metropolis)
    chains.start_ess = start_ess
    with torch.no_grad():
        negatives = adapter.negatives(chains.noise, use_mean=langevin_cfg.use_mu_cd)
    return chains, negatives


def start_in_the_tails(adapter: NoiseEnergy, noise: list[torch.Tensor], rows: BatchRows, fraction: float,
                       std: float) -> list[torch.Tensor]:
    """Fresh chains whose global index is below `fraction`·rows.total start from N(0, std² I) in ε_z
    (`langevin.tail_fraction`, `tail_std`); the others, ε_x and held noise are left as drawn.

    Why: a short chain from N(0, I) moves ε by about √(Kη) (0.8 for 60 steps at 0.01), so negatives only
    land near where the prior's bulk decodes; wherever else G(z) goes (the prior's tails) nothing raises
    the energy, and it can dig wells there that the tilted model then weights heavily (the exact tilt,
    log Z). Chains started in the tails put negatives there."""
    tail = round(fraction * rows.total)
    if tail == 0:
        return noise
    index = torch.arange(rows.start, rows.stop, device=noise[0].device)
    scale = torch.where(index < tail, std, 1.0)
    latent = len(adapter.latent_noise(noise))
    return [n * scale.view(-1, *[1] * (n.dim() - 1)) if i < latent and i not in adapter.held_noise else n
            for i, n in enumerate(noise)]


@torch.no_grad()
def importance_resample(adapter: NoiseEnergy, count: int, pool: int, generator: torch.Generator):
    """`count` draws from h(ε) ∝ N(ε; 0, I)·exp(−E(T(ε))) by importance resampling `pool` fresh prior draws
    with weights exp(−E) (self-normalized, with replacement; exact as the pool grows). Returns (the pool's
    noise, what the energy scored [pool, ...], its energies [pool] in fp32, the chosen indices [count])."""
    noise = adapter.initial_noise(pool, generator, generator.device)
    candidates = adapter.negatives(noise)
    energies = adapter.energy(candidates).float()
    chosen = torch.multinomial(torch.softmax(-energies, 0), count, replacement=True, generator=generator)
    return noise, candidates, energies, chosen


def resampled_starts(adapter: NoiseEnergy, count: int, per_chain: int, generator: torch.Generator):
    """Initial noise of `count` fresh chains, resampled from `per_chain`·count prior draws by exp(−E)
    (`langevin.start_pool`): one chain per row of each returned tensor [count, ...].

    Why: K local steps move a chain within a mode, not across, so chains from N(0, I) or the replay buffer
    keep their starts' mode proportions and the contrastive gradient never sees the modes' relative weights
    (README, "25-Gaussians"). Resampled starts arrive in (nearly) the model's proportions; the chains then
    correct what the small pool gets wrong within a mode. The pool is `per_chain` energy evaluations per
    fresh chain, without gradients. Also returns the pool's effective sample size per chain, (Σw)²/Σw²/count:
    below 1 the starts repeat (an energy too peaked for the pool, as in high dimension)."""
    noise, _, energies, chosen = importance_resample(adapter, count, per_chain * count, generator)
    weights = torch.softmax(-energies, 0)
    return [n[chosen] for n in noise], float(1.0 / weights.square().sum()) / count


@torch.no_grad()
def resampled_negatives(adapter: NoiseEnergy, batch: int, pool: int, generator: torch.Generator):
    """Exact negatives for 2-D toys (`langevin.negatives: resample`): `batch` draws from
    h ∝ p_vae·exp(−E), by importance resampling `pool` fresh VAE samples with weights exp(−E(x))
    (self-normalized; exact as the pool grows). Returns (a `LangevinResult` holding the chosen noise,
    no steps taken, and the chosen negatives)."""
    noise, candidates, energies, chosen = importance_resample(adapter, batch, pool, generator)
    picked = [n[chosen] for n in noise]
    result = LangevinResult(noise=picked, grad_norm=torch.zeros(1), noise_norm=torch.zeros(1),
                            energy=energies[chosen].mean().reshape(1).cpu())
    return result, candidates[chosen]
