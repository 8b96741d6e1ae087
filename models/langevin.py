"""The one Langevin sampler of the project, in the generator's noise space ε.

It lives in `models/` (not `trainer/`) so the inference bundle (`models/bundle.py`) can sample without
importing the trainer.

Every generator here is a deterministic map T(ε) of standard-normal noise, and every energy method
puts an energy on (part of) T(ε). The model's density in ε-space is then (VAEBM paper, Eq. 9 and
App. B, Eqs. 16–20)

    h(ε) ∝ exp(−E(T(ε))) · N(ε; 0, I),   so the Langevin potential is   U(ε) = E(T(ε)) + ½ Σ_i ‖ε_i‖²

summed over all noise tensors ε_i (latent groups, pixel noise). Each step (paper Eq. 2) is

    ε ← ε − (η/2) ∇_ε U(ε) + √η · ω,   ω ~ N(0, I),   the same η for every tensor.

We follow the paper, not the official code: the official scripts differentiate E − log p(z) − log p(x|z),
which adds Σ log σ terms (a missing Jacobian), clamps x to [−1, 1] and floors σ_x (see README, Design). Here
`energy_fn` is the energy only; no log σ, no clamp.

Gradients: we differentiate the batch SUM of U, so each chain follows its own ∇U_i and the step size does
not depend on the batch size. Gradients are taken with `torch.autograd.grad` w.r.t. ε only, so no
parameter of the generator or energy ever accumulates a `.grad`. ε is kept in fp32; `autocast_dtype`
wraps only `energy_fn` in `torch.autocast`.

Held noise: a tensor listed in `held` (e.g. the component selector ε_k of a VampPrior top group, on
which T is piecewise constant) is part of each chain's state but not of the dynamics: it is passed to
`energy_fn` unchanged at every step, gets no gradient, no ½‖ε‖² drift and no injected noise (its
½‖ε_k‖² is a constant of the chain). By default `langevin` reads `held` from `energy_fn.held_noise`,
which the adapters of `models/adapters.py` take from the VAE, so every caller honours it.

Metropolis adjustment (`metropolis=True`, MALA): each update becomes a proposal, accepted with probability
min(1, exp(U(ε) − U(ε') + log q(ε|ε') − log q(ε'|ε))), q the Gaussian proposal above. A chain then leaves h
invariant at any η, and a step that would climb an energy too stiff for η is refused instead of taken: short
unadjusted chains on a sharpening energy overshoot, land higher in energy and teach the energy to rise further
(README, "25-Gaussians"). The proposal's gradient is the next step's, so each step still costs one ∇U; the
uniform deciding acceptance is Φ(n) of one more standard normal per chain from the noise source.

Noise sources: `BatchNoise` (one draw per tensor per step, fast, for training: the caller seeds its
generator per (seed, rank, step)) and `PerChainNoise` (one generator per chain, so chain i's trajectory
depends only on its seed, whatever the batch size: for sampling).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, Protocol, Sequence

import torch

__all__ = [
    "EnergyFn", "NoiseSource", "BatchNoise", "PerChainNoise", "chain_seed", "LangevinResult", "langevin",
    "potential_gradient", "seeded_chains", "energy_on_generator",
]

EnergyFn = Callable[[list[torch.Tensor]], torch.Tensor]


class NoiseSource(Protocol):
    """Where Langevin draws its noise: anything with `sample(shapes, device)`."""

    def sample(self, shapes: Sequence[torch.Size], device: torch.device) -> list[torch.Tensor]:
        """One fp32 standard-normal tensor per shape (shapes include the batch dimension)."""
        ...


class BatchNoise:
    """One `torch.randn` per tensor per step from one generator (None: the global RNG of the device).

    The generator must live on the device the noise is drawn on (a CUDA generator for CUDA chains).
    Which chain gets which numbers depends on the batch size; use `PerChainNoise` where it must not.
    """

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def sample(self, shapes: Sequence[torch.Size], device: torch.device) -> list[torch.Tensor]:
        """One standard-normal tensor per shape, drawn from this source's generator on `device`."""
        return [torch.randn(shape, generator=self.generator, device=device) for shape in shapes]


def chain_seed(base_seed: int, index: int) -> int:
    """A 63-bit seed for chain `index` of a run seeded `base_seed` (splitmix64 mixing, so nearby
    (seed, index) pairs give unrelated streams)."""
    mask = (1 << 64) - 1
    z = (base_seed * 0x9E3779B97F4A7C15 + index + 1) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) >> 1


class PerChainNoise:
    """One CPU generator per chain: chain i's noise depends only on `chain_seeds[i]`.

    Drawn on the CPU (so the numbers are the same on every device) and copied to the chains' device.
    Use it for the initial noise too (`initial`), and image i of a sampling run is a function of its
    seed alone. Slower than `BatchNoise` (one draw per chain per tensor): meant for sampling.
    """

    def __init__(self, chain_seeds: Sequence[int] | torch.Tensor):
        seeds = chain_seeds.tolist() if isinstance(chain_seeds, torch.Tensor) else list(chain_seeds)
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    @classmethod
    def for_indices(cls, base_seed: int, start: int, count: int) -> "PerChainNoise":
        """Chains `start … start+count−1` of a run seeded `base_seed` (seeds from `chain_seed`)."""
        return cls([chain_seed(base_seed, i) for i in range(start, start + count)])

    def __len__(self) -> int:
        return len(self.generators)

    def sample(self, shapes: Sequence[torch.Size], device: torch.device) -> list[torch.Tensor]:
        """One standard-normal tensor per shape [B, ...], row i from chain i's own generator (B = number of chains)."""
        out = []
        for shape in shapes:
            if shape[0] != len(self.generators):
                raise ValueError(f"PerChainNoise has {len(self.generators)} chains, got a batch of {shape[0]}")
            rows = [torch.randn(tuple(shape[1:]), generator=g) for g in self.generators]
            out.append(torch.stack(rows).to(device))
        return out

    def initial(self, sample_shapes: Sequence[Sequence[int]], device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """Initial noise, one tensor [num_chains, *shape] per per-sample shape."""
        batch = len(self.generators)
        return self.sample([torch.Size((batch, *s)) for s in sample_shapes], torch.device(device))


@dataclasses.dataclass
class LangevinResult:
    """Final noise (detached, fp32) and per-step diagnostics, each a CPU tensor [steps].

    Diagnostics of step t are measured at ε_t, the state whose energy step t evaluates (before its
    update): `grad_norm` = mean over chains of ‖∇U‖ (all tensors together), `noise_norm` = mean over
    chains of ‖ε‖, `energy` = mean over chains of E (without the ½‖ε‖² term). `acceptance` [steps]: the
    share of chains whose proposal step t accepted (Metropolis-adjusted runs only; empty otherwise).
    `start_ess`: set by the trainer when chains start from resampled prior draws (`langevin.start_pool`):
    the effective sample size of the pool's weights per chain started (below 1: starts repeat).
    """

    noise: list[torch.Tensor]
    grad_norm: torch.Tensor
    noise_norm: torch.Tensor
    energy: torch.Tensor
    acceptance: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(0))
    start_ess: float | None = None

    def summary(self) -> dict[str, float]:
        """First/last values, for logging."""
        if len(self.energy) == 0:
            return {}
        return {
            "energy_first": float(self.energy[0]),
            "energy_last": float(self.energy[-1]),
            "grad_norm_mean": float(self.grad_norm.mean()),
            "noise_norm_last": float(self.noise_norm[-1]),
            **({"acceptance": float(self.acceptance.mean())} if len(self.acceptance) else {}),
        }


def _per_chain_sq_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_i ‖t_i[b]‖² for each chain b: [B]."""
    # vector_norm reduces without materializing the squared tensor (this runs twice per step).
    return sum(torch.linalg.vector_norm(t.detach().flatten(1), dim=1).square() for t in tensors)


def langevin(
    noise: list[torch.Tensor],
    energy_fn: EnergyFn,
    steps: int,
    step_size: float,
    noise_source: NoiseSource | None = None,
    autocast_dtype: torch.dtype | None = None,
    callback: Callable[[int, list[torch.Tensor]], None] | None = None,
    callback_every: int = 0,
    held: Sequence[int] | None = None,
    metropolis: bool = False,
) -> LangevinResult:
    """Run `steps` Langevin updates of U(ε) = energy_fn(ε) + ½Σ‖ε_i‖² from the initial noise.

    Args:
        noise: initial ε, a list of tensors [B, ...] (e.g. one per latent group, plus ε_x). Not modified.
        energy_fn: list of tensors → energies [B] (e.g. `energy_on_generator(generator, energy)`).
        steps: number of updates K.
        step_size: η; the injected noise has standard deviation √η.
        noise_source: where ω comes from; default `BatchNoise()` (the global RNG).
        autocast_dtype: if set (e.g. torch.bfloat16), `energy_fn` runs under `torch.autocast`.
        callback, callback_every: if both set, `callback(t, ε_t)` is called with detached copies for
            t = 0, k, 2k, … ≤ steps (t counts updates done), e.g. for chain visualizations.
        held: indices into `noise` of tensors carried unchanged (see the module docstring); None: the
            `held_noise` attribute of `energy_fn` if it has one, else none. Diagnostics and the noise
            source cover the moving tensors only.
        metropolis: accept or refuse each update by the Metropolis–Hastings rule (MALA; module docstring).

    Returns:
        `LangevinResult` with the final noise (detached fp32, same shapes; held tensors as given) and
        per-step diagnostics.
    """
    if not noise:
        raise ValueError("langevin needs at least one noise tensor")
    held = set(getattr(energy_fn, "held_noise", ()) if held is None else held)
    if not held <= set(range(len(noise))):
        raise ValueError(f"held noise indices {sorted(held)} out of range for {len(noise)} noise tensors")
    moving = [i for i in range(len(noise)) if i not in held]
    if not moving:
        raise ValueError("langevin needs at least one noise tensor that is not held")
    noise_source = noise_source if noise_source is not None else BatchNoise()
    device = noise[0].device
    shapes = [noise[i].shape for i in moving]
    drift, diffusion = -0.5 * step_size, math.sqrt(step_size)
    # Our own fp32 leaves; updated in place below (under no_grad), so no copy per step. Held ones take no grad.
    eps = [n.detach().to(torch.float32, copy=True).requires_grad_(i not in held) for i, n in enumerate(noise)]
    moved = [eps[i] for i in moving]
    grad_norms, noise_norms, energies = [], [], []

    def maybe_callback(t: int) -> None:
        if callback is not None and callback_every > 0 and t % callback_every == 0:
            callback(t, [e.detach().clone() for e in eps])

    maybe_callback(0)
    acceptance = []
    # ∇U at the current state; each step leaves it computed at the state the next step starts from.
    energy, grads = potential_gradient(energy_fn, eps, moving, autocast_dtype) if steps else (None, [])
    for t in range(steps):
        with torch.no_grad():
            energies.append(energy.float().mean())
            grad_norms.append(_per_chain_sq_norm(grads).sqrt().mean())
            noise_norms.append(_per_chain_sq_norm(moved).sqrt().mean())
            omegas = noise_source.sample(shapes, device)
        if metropolis:
            energy, grads, accepted = _metropolis_step(energy_fn, eps, moving, energy, grads, omegas, step_size,
                                                       noise_source, autocast_dtype)
            acceptance.append(accepted)
        else:
            with torch.no_grad():
                for e, g, omega in zip(moved, grads, omegas):
                    e.add_(g, alpha=drift).add_(omega, alpha=diffusion)
            if t + 1 < steps:
                energy, grads = potential_gradient(energy_fn, eps, moving, autocast_dtype)
        maybe_callback(t + 1)

    def stacked(values: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(values).cpu() if values else torch.zeros(0)

    return LangevinResult(
        noise=[e.detach() for e in eps],
        grad_norm=stacked(grad_norms),
        noise_norm=stacked(noise_norms),
        energy=stacked(energies),
        acceptance=stacked(acceptance),
    )


def _metropolis_step(energy_fn: EnergyFn, eps: list[torch.Tensor], moving: Sequence[int], energy: torch.Tensor,
                     grads: list[torch.Tensor], omegas: list[torch.Tensor], step_size: float,
                     noise_source: NoiseSource, autocast_dtype: torch.dtype | None):
    """One MALA step, in place on the moving tensors of `eps`: propose ε' = ε − (η/2)∇U(ε) + √η ω, evaluate
    E and ∇U there, and keep ε' in the chains that accept it. Returns (E [B], ∇U) at the new states and the share
    of chains that accepted.

    Acceptance: log u < U(ε) − U(ε') + log q(ε|ε') − log q(ε'|ε), with q(b | a) = N(b; a − (η/2)∇U(a), η I), i.e.
    log q(b | a) = −‖b − a + (η/2)∇U(a)‖² / (2η) + const; u = Φ(n), n one more normal per chain from the noise
    source. A non-finite trial (an energy that overflowed) is refused: log u < NaN is False.
    """
    moved = [eps[i] for i in moving]
    with torch.no_grad():
        proposal = [e - 0.5 * step_size * g + math.sqrt(step_size) * omega for e, g, omega in zip(moved, grads, omegas)]
        uniform = torch.special.ndtr(noise_source.sample([torch.Size((len(energy),))], moved[0].device)[0])
    trial = list(eps)
    for i, p in zip(moving, proposal):
        trial[i] = p.requires_grad_(True)
    trial_energy, trial_grads = potential_gradient(energy_fn, trial, moving, autocast_dtype)

    def log_q(to, frm, grad_frm):  # [B], up to the constant, which cancels
        return -_per_chain_sq_norm([b - a + 0.5 * step_size * g for b, a, g in zip(to, frm, grad_frm)]) / (2 * step_size)

    with torch.no_grad():
        potential = energy.float() + 0.5 * _per_chain_sq_norm(moved)
        trial_potential = trial_energy.float() + 0.5 * _per_chain_sq_norm(proposal)
        log_ratio = potential - trial_potential + log_q(moved, proposal, trial_grads) - log_q(proposal, moved, grads)
        accept = torch.log(uniform) < log_ratio

        def keep(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
            return torch.where(accept.view(-1, *[1] * (old.dim() - 1)), new, old)

        for e, p in zip(moved, proposal):
            e.copy_(keep(p, e))
        return (keep(trial_energy.float(), energy.float()), [keep(tg, g) for g, tg in zip(grads, trial_grads)],
                accept.float().mean())


def potential_gradient(energy_fn: EnergyFn, eps: list[torch.Tensor], moving: Sequence[int],
                       autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The energy E(ε) [B] (detached) and ∇U = ∇E + ε of the tensors `eps[i]`, i in `moving` (in that
    order): the differentiable part of one Langevin step, which compiles as one graph (tests/test_compile.py).

    `eps`: the chains' noise, fp32 leaves, the moving ones requiring grad; `autocast_dtype`: if set, the
    energy runs under `torch.autocast`. Checks that the energy holds one value per chain.
    """
    autocast = contextlib.nullcontext() if autocast_dtype is None \
        else torch.autocast(device_type=eps[0].device.type, dtype=autocast_dtype)
    with autocast:
        energy = energy_fn(eps)
    batch = eps[0].shape[0]
    if energy.shape != (batch,):
        raise ValueError(f"energy_fn must return one energy per chain, shape [{batch}], got {list(energy.shape)}")
    moved = [eps[i] for i in moving]
    if energy.requires_grad:
        # d(Σ_b E_b)/dε: per-chain gradients, since chain b's energy depends only on chain b's ε.
        grads = torch.autograd.grad(energy.float().sum(), moved, allow_unused=True)
    else:  # the energy does not depend on ε at all (e.g. a zero energy)
        grads = [None] * len(moved)
    with torch.no_grad():
        # ∇U = ∇E + ε: the gradient of ½‖ε‖² is added analytically. Out of place, because autograd
        # may hand back expanded or shared tensors that must not be written to.
        grads = [e.clone() if g is None else g + e for g, e in zip(grads, moved)]
    return energy.detach(), grads


def seeded_chains(energy_fn, start: int, count: int, *, seed: int, steps: int, step_size: float,
                  device: torch.device | str = "cpu", metropolis: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Chains start … start+count−1 of a run seeded `seed`: (initial noise, noise after `steps` Langevin steps).

    Chain i's initial and Langevin noise come from its own generator (`PerChainNoise`), so its trajectory
    depends only on (seed, i), whatever the batch it runs in. `energy_fn` is an energy adapter
    (`models/adapters.py`): its `chain_shapes` give the noise, and `adapter.images(...)` turns either result
    into decoder means. With `steps` = 0 the two results are the same tensors (VAE samples).
    """
    chain_noise = PerChainNoise.for_indices(seed, start, count)
    initial = chain_noise.initial(energy_fn.chain_shapes, device)
    if steps == 0:
        return initial, initial
    with torch.enable_grad():  # callers often sample under no_grad; Langevin needs ∇E
        chains = langevin(initial, energy_fn, steps, step_size, chain_noise, metropolis=metropolis)
    return initial, chains.noise


def energy_on_generator(
    generator_fn: Callable[[list[torch.Tensor]], torch.Tensor], energy: Callable[[torch.Tensor], torch.Tensor]
) -> EnergyFn:
    """The simplest adapter: ε ↦ energy(generator_fn(ε)), e.g. a pixel energy on a decoder's output."""

    def energy_fn(noise: list[torch.Tensor]) -> torch.Tensor:
        return energy(generator_fn(noise))

    return energy_fn
