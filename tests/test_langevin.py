"""The Langevin sampler: invariance, the analytic tilted Gaussian, per-chain reproducibility, no .grad.

Unadjusted Langevin with step η on a Gaussian target of precision Λ has the exact target mean as its
fixed point, and stationary covariance (I − M²)⁻¹η with M = I − (η/2)Λ, i.e. per eigenvalue λ a
variance 1/(λ(1 − ηλ/4)): a relative bias of ηλ/4. The tests choose η so that bias is far below the
Monte-Carlo tolerance, and compare against the continuous-time (analytic) target.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from models.langevin import (
    BatchNoise,
    PerChainNoise,
    chain_seed,
    energy_on_generator,
    langevin,
)
from trainer.bench.ebm import bench_langevin


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: intra-op threads only add scheduling latency on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _zero_energy(noise):
    return torch.zeros(noise[0].shape[0], device=noise[0].device)


def test_zero_energy_leaves_standard_normal_invariant():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    chains, steps, eta = 10000, 200, 0.02
    noise = [torch.randn(chains, 3, generator=gen), torch.randn(chains, 2, 2, generator=gen)]
    result = langevin(noise, _zero_energy, steps, eta, noise_source=BatchNoise(gen))
    eps = torch.cat([t.flatten(1) for t in result.noise], dim=1)  # [chains, 7]
    # 7 coordinates × 10000 chains. SE of a coordinate mean ≈ 1/√10000 = 0.01, of a variance
    # ≈ √(2/10000) = 0.014; the discretization bias of the variance is η/4 = 0.005. Tolerances are
    # 4.5 SE (+ bias). A wrong noise scale (e.g. √(2η)) would give a variance ≈ 1.98 after 200 steps,
    # a wrong drift sign would blow up.
    assert eps.mean(0).abs().max() < 0.045
    assert (eps.var(0) - 1).abs().max() < 0.07
    assert torch.isfinite(result.grad_norm).all() and result.grad_norm.shape == (steps,)
    # Chains actually moved (the test would pass trivially if nothing were updated).
    assert not torch.allclose(result.noise[0], noise[0])


def test_linear_gaussian_generator_matches_tilted_gaussian():
    """x = Aε + b, E(x) = ½(x−m)ᵀP(x−m): h(ε) ∝ exp(−E)N(0,I) is N(μ, Λ⁻¹), Λ = AᵀPA + I, μ = −Λ⁻¹AᵀP(b−m)."""
    g = torch.Generator().manual_seed(0)
    d_eps = 3
    A = torch.tensor([[1.0, 0.5, -0.3], [0.2, -0.8, 0.6]], dtype=torch.float64)
    b = torch.tensor([0.3, -0.2], dtype=torch.float64)
    m = torch.tensor([1.0, 0.5], dtype=torch.float64)
    P = torch.tensor([[2.0, 0.3], [0.3, 1.0]], dtype=torch.float64)
    Lam = A.T @ P @ A + torch.eye(d_eps, dtype=torch.float64)
    cov_eps = torch.linalg.inv(Lam)
    mu_eps = -cov_eps @ A.T @ P @ (b - m)
    mu_x, cov_x = A @ mu_eps + b, A @ cov_eps @ A.T

    def generator(noise):  # two noise tensors, as in a VAE: ε_z [B, 2] and ε_x [B, 1]
        eps = torch.cat(noise, dim=1)
        return eps @ A.float().T + b.float()

    def energy(x):
        r = x - m.float()
        return 0.5 * ((r @ P.float()) * r).sum(1)

    chains, eta = 10000, 0.02
    # A mode of precision λ contracts by (1 − ηλ/2) per step. λ = 1 is A's null space, where the target
    # is N(0, 1) = the start; the next, λ ≈ 1.93, decays as e^-11.6 over 600 steps.
    steps = 600
    noise = [torch.randn(chains, 2, generator=g), torch.randn(chains, 1, generator=g)]
    result = langevin(noise, energy_on_generator(generator, energy), steps, eta, noise_source=BatchNoise(g))
    eps = torch.cat(result.noise, dim=1).double()
    x = eps @ A.T + b
    # Tolerances: 5 standard errors (SE of a mean √(σ²/N), of a covariance √((σ_ii σ_jj + σ_ij²)/N))
    # plus the known discretization bias: ULA's stationary covariance is V diag(η/(1−(1−ηλ/2)²)) Vᵀ
    # (≈ 1/(λ(1−ηλ/4)) per eigenvalue λ of Λ), ≤ 1.8% away from the continuous target here.
    lam, V = torch.linalg.eigh(Lam)
    cov_ula_eps = V @ torch.diag(eta / (1 - (1 - eta * lam / 2) ** 2)) @ V.T
    cov_ula_x = A @ cov_ula_eps @ A.T
    for sample, mu, cov, cov_ula in [(eps, mu_eps, cov_eps, cov_ula_eps), (x, mu_x, cov_x, cov_ula_x)]:
        var = torch.diagonal(cov)
        se_mean = (var / chains).sqrt()
        assert ((sample.mean(0) - mu).abs() < 5 * se_mean).all(), (sample.mean(0), mu)
        se_cov = ((var[:, None] * var[None, :] + cov**2) / chains).sqrt()
        emp_cov = torch.cov(sample.T)
        tol = 5 * se_cov + (cov_ula - cov).abs()
        assert ((emp_cov - cov).abs() < tol).all(), (emp_cov, cov)
    # The tilt is substantial, so the test distinguishes the tilted target from N(0, I) (and from a
    # potential without the ½‖ε‖² term or with a batch-mean gradient).
    assert (mu_eps.abs().max() > 0.2) and (torch.diagonal(cov_eps).min() < 0.5)
    # Diagnostics: the mean energy decreased from the N(0, I) start towards the tilted equilibrium.
    assert result.energy[-1] < result.energy[0]


class _SmallMLP(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim_in, 32), nn.SiLU(), nn.Linear(32, dim_out))

    def forward(self, x):
        return self.net(x)


def _mlp_problem():
    torch.manual_seed(0)
    gen_net, energy_net = _SmallMLP(6, 4), _SmallMLP(4, 1)

    def generator(noise):
        return gen_net(torch.cat([noise[0].flatten(1), noise[1]], dim=1))

    return gen_net, energy_net, energy_on_generator(generator, lambda x: energy_net(x).squeeze(-1))


def test_per_chain_noise_is_batch_size_independent():
    _, _, energy_fn = _mlp_problem()
    shapes = [(2, 2), (2,)]
    big = PerChainNoise.for_indices(base_seed=7, start=0, count=16)
    out_big = langevin(big.initial(shapes), energy_fn, 20, 0.05, noise_source=big).noise
    one = PerChainNoise.for_indices(base_seed=7, start=5, count=1)
    out_one = langevin(one.initial(shapes), energy_fn, 20, 0.05, noise_source=one).noise
    for a, b in zip(out_big, out_one):
        torch.testing.assert_close(a[5:6], b, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(a[4:5], b, atol=1e-3)  # another chain really is different
    # Chain i's numbers come from its seed alone: a fresh source with the same seed repeats them.
    assert PerChainNoise([chain_seed(7, 5)]).initial(shapes)[0].equal(PerChainNoise.for_indices(7, 5, 1).initial(shapes)[0])
    assert chain_seed(7, 5) != chain_seed(7, 6) and chain_seed(7, 5) != chain_seed(8, 5)


def test_no_parameter_gradients_after_langevin():
    gen_net, energy_net, energy_fn = _mlp_problem()
    params = list(gen_net.parameters()) + list(energy_net.parameters())
    assert all(p.requires_grad for p in params)  # the worst case: nothing frozen
    noise = [torch.randn(8, 2, 2), torch.randn(8, 2)]
    before = [n.clone() for n in noise]
    result = langevin(noise, energy_fn, 5, 0.1)
    assert all(p.grad is None for p in params)
    assert all(torch.equal(a, b) for a, b in zip(noise, before))  # input noise untouched
    assert all(not t.requires_grad and t.grad_fn is None for t in result.noise)


def test_gradient_is_per_chain_sum_not_mean():
    # One step with ω = 0 (a noise source returning zeros): ε₁ = ε₀ − (η/2)(∇E + ε₀) per chain, whatever B.
    class ZeroNoise:
        def sample(self, shapes, device):
            return [torch.zeros(s, device=device) for s in shapes]

    _, _, energy_fn = _mlp_problem()
    noise = [torch.randn(16, 2, 2), torch.randn(16, 2)]
    eta = 0.1
    eps = [n.clone().requires_grad_(True) for n in noise]
    grads = torch.autograd.grad(energy_fn([eps[0][3:4], eps[1][3:4]]).sum(), eps)
    expected = [n[3:4] - eta / 2 * (g[3:4] + n[3:4]) for n, g in zip(noise, grads)]
    out = langevin(noise, energy_fn, 1, eta, noise_source=ZeroNoise()).noise
    for o, e in zip(out, expected):
        torch.testing.assert_close(o[3:4], e, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_keeps_noise_fp32():
    from models.energy import EnergyNetConfig, build_energy

    torch.manual_seed(0)
    energy = build_energy(EnergyNetConfig(layout="digits16", in_channels=1))
    energy.initialize_from_data(torch.rand(8, 1, 16, 16) * 2 - 1)
    seen = []

    def energy_fn(noise):
        x = torch.tanh(noise[0])
        e = energy(x)
        seen.append(e.dtype)
        return e

    noise = [torch.randn(4, 1, 16, 16)]
    result = langevin(noise, energy_fn, 3, 1e-3, autocast_dtype=torch.bfloat16)
    assert seen and all(d == torch.bfloat16 for d in seen)  # the energy really ran in bf16
    assert result.noise[0].dtype == torch.float32 and torch.isfinite(result.noise[0]).all()
    assert torch.isfinite(result.energy).all()


def test_callback_every_k_steps():
    calls = []
    noise = [torch.randn(4, 3)]
    langevin(noise, _zero_energy, 7, 0.1, callback=lambda t, eps: calls.append((t, eps[0].clone())), callback_every=3)
    assert [t for t, _ in calls] == [0, 3, 6]
    assert torch.equal(calls[0][1], noise[0])


def test_bad_energy_shape_is_rejected():
    with pytest.raises(ValueError):
        langevin([torch.randn(4, 3)], lambda n: n[0].sum(), 1, 0.1)


def test_bench_langevin_runs():
    gen = nn.Sequential(nn.Flatten(), nn.Linear(8, 16)).requires_grad_(False)
    energy = nn.Sequential(nn.Linear(16, 1), nn.Flatten(0))
    out = bench_langevin(lambda n: gen(n[0]), energy, [(8,)], batch_size=4, steps=2, step_size=0.01, repeats=1)
    assert {"ld_step_s", "fwd_bwd_s", "ratio", "peak_mem_mb"} <= out.keys()
    assert out["ratio"] > 0 and math.isfinite(out["ratio"])


def test_metropolis_adjustment_removes_the_step_size_bias():
    # U(ε) = ½λ‖ε‖² with λ = 10 (E = 4.5‖ε‖²): the target variance is 1/λ = 0.1. At η = 0.3 unadjusted
    # Langevin's stationary variance is 1/(λ(1 − ηλ/4)) = 0.4 (module docstring); MALA's is the target's.
    energy = lambda noise: 4.5 * noise[0].square().sum(1)  # noqa: E731
    start = [0.3 * torch.randn(20000, 2, generator=torch.Generator().manual_seed(0))]
    unadjusted = langevin(start, energy, 200, 0.3, BatchNoise(torch.Generator().manual_seed(1)))
    adjusted = langevin(start, energy, 200, 0.3, BatchNoise(torch.Generator().manual_seed(1)), metropolis=True)
    assert unadjusted.noise[0].var(0).min() > 0.35 and len(unadjusted.acceptance) == 0
    assert adjusted.noise[0].var(0).sub(0.1).abs().max() < 0.006  # ~6 standard errors of a variance from 20,000
    assert adjusted.acceptance.shape == (200,) and 0.2 < float(adjusted.acceptance.mean()) < 0.8
    assert adjusted.energy.shape == (200,) and "acceptance" in adjusted.summary()


def test_metropolis_refuses_moves_into_an_overflowing_energy():
    # The energy is +inf wherever ε₀ > 1: proposals there must be refused, chains stay finite.
    def energy(noise):
        x = noise[0]
        return 0.5 * x.square().sum(1) + torch.zeros(len(x)).masked_fill(x[:, 0] > 1.0, float("inf"))

    start = [torch.zeros(512, 2)]
    result = langevin(start, energy, 50, 0.5, BatchNoise(torch.Generator().manual_seed(2)), metropolis=True)
    assert torch.isfinite(result.noise[0]).all() and (result.noise[0][:, 0] <= 1.0).all()
    assert 0.0 < float(result.acceptance.mean()) < 1.0
