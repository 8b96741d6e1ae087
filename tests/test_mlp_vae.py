"""MLPVAE: shapes and NVAE-compatible API, the ε ↔ x maps, KL, importance-weighted likelihood, training."""
import math

import pytest
import torch
import torch.nn as nn

from models.adapters import VAEBMEnergy
from models.energy import MLPEnergy
from models.mlp_vae import MLPVAE, MLPVAEConfig
from trainer.nvae.objective import kl_balance_alphas, nvae_loss


def small_model(seed: int = 0, **overrides) -> MLPVAE:
    torch.manual_seed(seed)
    cfg = dict(data_dim=3, latent_dim=5, hidden=32, depth=2)
    return MLPVAE(MLPVAEConfig(**{**cfg, **overrides}))


def test_shapes_and_nvae_compatible_api():
    model = MLPVAE(MLPVAEConfig())  # the VAEBM §5.4 size: 2-D data, 20-d latent, 4 × 256 units
    assert sum(isinstance(m, nn.Linear) for m in model.encoder) == 5  # 4 hidden layers + head
    assert model.latent_shapes == [(20,)] and model.image_shape == (2,)
    assert model.num_groups == 1 and model.groups_per_scale_decoder_order == [1]
    x = torch.randn(7, 2)
    out = model(x)
    assert out.x_mean.shape == out.x_log_sigma.shape == (7, 2)
    assert out.recon_log_prob.shape == (7,)
    assert [t.shape for t in out.kl_per_group] == [(7,)]
    assert [t.shape for t in out.kl_per_channel] == [(20,)]
    assert [t.shape for t in out.z] == [(7, 20)]
    assert torch.allclose(out.kl_per_channel[0].sum(), out.kl_per_group[0].mean(), atol=1e-5)
    gen = model.sample(4, generator=torch.Generator().manual_seed(0))
    assert gen.z[0].shape == (4, 20) and gen.x_sample.shape == gen.x_mean.shape == (4, 2)
    for term in (model.spectral_loss(), model.bn_loss()):
        assert term.shape == () and term.item() == 0.0

    # The trainers' code runs unchanged: the NVAE loss and the VAEBM energy adapter.
    alphas = kl_balance_alphas(model.groups_per_scale_decoder_order)
    loss, terms = nvae_loss(out, 0.5, alphas, 0.1, model.spectral_loss(), model.bn_loss())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(terms["nelbo"])
    adapter = VAEBMEnergy(model, MLPEnergy(2, hidden=16, depth=2), temperature=0.8)
    noise = adapter.initial_noise(5, torch.Generator().manual_seed(1), "cpu")
    assert [n.shape for n in noise] == [(5, 20), (5, 2)]
    assert adapter(noise).shape == (5,)


@pytest.mark.parametrize("field, value", [
    ("data_dim", 0), ("latent_dim", -1), ("hidden", 0), ("depth", 0), ("activation", "gelu2"),
    ("min_log_sigma", float("-inf")),
])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}"):
        MLPVAEConfig(**{field: value}).validate()


def test_decoder_log_sigma_floor():
    model = small_model(min_log_sigma=-3.0)
    with torch.no_grad():
        model.decoder[-1].bias[3:] = -100.0  # raw log σ far below the floor
    _, log_sigma = model.decode_params(torch.randn(4, 5))
    assert torch.all(log_sigma >= -3.0) and torch.allclose(log_sigma, torch.full_like(log_sigma, -3.0))


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("sample", [True, False])
def test_noise_round_trip(temperature, sample):
    model = small_model()
    x = torch.randn(16, 3)
    eps_z, eps_x = model.encode_noise(x, temperature, sample=sample, generator=torch.Generator().manual_seed(3))
    gen = model.decode(eps_z, eps_x, temperature=temperature)
    assert torch.allclose(gen.x_sample, x, atol=1e-5)
    mu_q, _ = model.encode(x)
    assert torch.allclose(gen.z[0], mu_q, atol=1e-6) != sample  # sample=False decodes the posterior mean
    # Same generator seed, same noise; and latents_to_noise inverts decode too.
    again, _ = model.encode_noise(x, temperature, sample=sample, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again[0], eps_z[0])
    eps_z2, eps_x2 = model.latents_to_noise(gen.z, gen.x_sample, temperature)
    assert torch.allclose(eps_z2[0], eps_z[0], atol=1e-6) and torch.allclose(eps_x2, eps_x, atol=1e-4)


def test_decode_is_differentiable_in_the_noise():
    model = small_model().requires_grad_(False)
    eps_z = torch.randn(6, 5, requires_grad=True)
    eps_x = torch.randn(6, 3, requires_grad=True)
    gz, gx = torch.autograd.grad(model.decode([eps_z], eps_x, 0.7).x_sample.square().sum(), (eps_z, eps_x))
    assert gz.abs().sum() > 0 and gx.abs().sum() > 0


def test_temperature_scales_z_and_decoder_sigma():
    model = small_model()
    eps_z, eps_x = torch.randn(8, 5), torch.randn(8, 3)
    gen = model.decode([eps_z], eps_x, temperature=0.5)
    assert torch.allclose(gen.z[0], 0.5 * eps_z)
    assert torch.allclose(gen.x_sample - gen.x_mean, 0.5 * torch.exp(gen.x_log_sigma) * eps_x, atol=1e-6)
    x_mean, x_log_sigma = model.decode_params(0.5 * eps_z)  # x_log_sigma is the t = 1 value
    assert torch.allclose(gen.x_mean, x_mean) and torch.allclose(gen.x_log_sigma, x_log_sigma)
    z = model.sample(20000, temperature=0.3, generator=torch.Generator().manual_seed(0)).z[0]
    assert abs(z.std().item() - 0.3) < 0.01 and abs(z.mean().item()) < 0.01


def test_kl_matches_monte_carlo():
    model = small_model()
    with torch.no_grad():
        model.encoder[-1].bias[5:] -= 1.0  # σ_q ≈ e⁻¹: far from the prior, so the KL is sizeable
    x = torch.randn(4, 3)
    with torch.no_grad():
        kl = model(x).kl_per_group[0]  # [4]
        mu, log_sigma = model.encode(x)
        q = torch.distributions.Normal(mu, log_sigma.exp())
        z = q.sample((40000,))  # [K, 4, 5]
        per_sample = (q.log_prob(z) - torch.distributions.Normal(0.0, 1.0).log_prob(z)).sum(-1)
    mc, stderr = per_sample.mean(0), per_sample.std(0) / math.sqrt(per_sample.shape[0])
    assert torch.all(kl > 1.0)
    assert torch.all((kl - mc).abs() < 5 * stderr + 1e-4), (kl, mc, stderr)


# ----------------------------------------------------------------------------------------------
# Importance-weighted likelihood on a linear-Gaussian VAE whose log p(x) is known in closed form:
# z ~ N(0, I_L), x = A z + b + σ·ε with A = Q[:, :L]·diag(s) (orthogonal columns), so
# p(x) = N(b, AAᵀ + σ²I) and the posterior is diagonal:
# q*(z|x) = N(diag(s/(s² + σ²)) Q_Lᵀ (x − b), diag(σ²/(s² + σ²))).

D, L, SIGMA = 3, 2, 0.4


def linear_gaussian_vae(mean_shift: float = 0.0, sigma_scale: float = 1.0):
    """(model with linear encoder/decoder, analytic marginal p(x)); the encoder is the exact posterior
    for mean_shift = 0 and sigma_scale = 1, a perturbed one otherwise."""
    torch.manual_seed(0)
    model = MLPVAE(MLPVAEConfig(data_dim=D, latent_dim=L, hidden=8, depth=1)).double()
    q_full, _ = torch.linalg.qr(torch.randn(D, D, dtype=torch.float64))
    s = torch.tensor([1.5, 0.7], dtype=torch.float64)
    b = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    a = q_full[:, :L] * s
    model.decoder = nn.Linear(L, 2 * D).double()
    model.encoder = nn.Linear(D, 2 * L).double()
    floor = model.cfg.min_log_sigma
    post_var = SIGMA**2 / (s**2 + SIGMA**2)
    w = (s / (s**2 + SIGMA**2))[:, None] * q_full[:, :L].T  # [L, D]
    with torch.no_grad():
        model.decoder.weight.zero_()
        model.decoder.weight[:D] = a
        model.decoder.bias[:D] = b
        model.decoder.bias[D:] = floor + math.log(math.expm1(math.log(SIGMA) - floor))  # inverse of the floor
        model.encoder.weight.zero_()
        model.encoder.weight[:L] = w
        model.encoder.bias[:L] = -w @ b + mean_shift
        model.encoder.bias[L:] = 0.5 * torch.log(post_var) + math.log(sigma_scale)
    marginal = torch.distributions.MultivariateNormal(b, a @ a.T + SIGMA**2 * torch.eye(D, dtype=torch.float64))
    return model, marginal


def test_log_likelihood_is_exact_with_the_true_posterior():
    model, marginal = linear_gaussian_vae()
    x = marginal.sample((50,))
    _, log_sigma = model.decode_params(torch.zeros(1, L, dtype=torch.float64))
    assert torch.allclose(log_sigma, torch.full_like(log_sigma, math.log(SIGMA)))
    # Every importance weight equals p(x); a chunk size of 7 samples exercises the chunking.
    estimate = model.log_likelihood(x, num_samples=100, batch=7 * 50, generator=torch.Generator().manual_seed(0))
    assert estimate.shape == (50,)
    assert torch.allclose(estimate, marginal.log_prob(x), atol=1e-9, rtol=0)


def test_log_likelihood_bounds_with_a_mismatched_encoder():
    model, marginal = linear_gaussian_vae(mean_shift=0.4, sigma_scale=1.6)
    x = marginal.sample((40,))
    true = marginal.log_prob(x).mean().item()
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    with torch.no_grad():
        reps = x.repeat(500, 1)  # the ELBO, averaged over 500 posterior samples per point
        out = model(reps)
        elbo = (out.recon_log_prob - out.kl_per_group[0]).mean().item()
    iw1 = model.log_likelihood(x, num_samples=1, generator=g)  # one-sample estimate: the ELBO's
    iw1_mean = torch.stack([model.log_likelihood(x, 1, generator=g) for _ in range(200)]).mean().item()
    iw_many = model.log_likelihood(x, num_samples=3000, batch=3 * 40, generator=g).mean().item()  # 1000 chunks
    assert iw1.shape == (40,)
    assert abs(iw1_mean - elbo) < 0.05, (iw1_mean, elbo)
    assert elbo < true - 0.3  # the perturbed encoder leaves a real gap ...
    assert elbo + 0.25 < iw_many <= true + 0.03  # ... which many samples close (up to MC error, std ≈ 0.005)
    assert true - iw_many < 0.1 * (true - elbo), (elbo, iw_many, true)


@pytest.fixture
def one_thread():
    """Tiny matmuls: one intra-op thread is faster than two on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_short_training_decreases_negative_elbo(one_thread):
    torch.manual_seed(0)
    model = MLPVAE(MLPVAEConfig(data_dim=2, latent_dim=4, hidden=64, depth=2))
    scale, shift = torch.tensor([0.5, 0.1]), torch.tensor([1.0, -2.0])
    data = lambda n: torch.randn(n, 2) * scale + shift  # noqa: E731
    held_out = data(2000)

    def nelbo() -> float:
        with torch.no_grad():
            out = model(held_out)
            return -(out.recon_log_prob - out.kl_per_group[0]).mean().item()

    before = nelbo()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(200):
        out = model(data(128))
        loss = -(out.recon_log_prob - out.kl_per_group[0]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = nelbo()
    entropy = 0.5 * 2 * (1 + math.log(2 * math.pi)) + torch.log(scale).sum().item()  # ≈ −0.16, the optimum
    assert after < before - 2.0, (before, after)
    assert after > entropy - 0.1  # an upper bound on −log p(x) can't beat the data's entropy
