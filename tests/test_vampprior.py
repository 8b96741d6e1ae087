"""VampPrior and the VAE/HVAE of Tomczak & Welling (2018): densities, the ε ↔ z maps, importance-sampled
likelihoods against exact integrals, training/resume/export through the project's scripts, the experiment."""
import json
import math

import pytest
import torch
from conftest import run_script

from models import vampprior
from models.hvae import HVAE, HVAEConfig
from trainer.run.checkpoint import latest_checkpoint

TINY = dict(hidden=24, latent_dim=3, pseudo_inputs=5)
# Script overrides for a tiny, fast training run of the preset.
TINY_RUN = ["model.hidden=16", "model.latent_dim=4", "model.pseudo_inputs=6", "train.per_device_batch_size=8",
            "train.global_batch_size=8", "data.num_workers=0", "train.log_every=1", "train.progress_bar=false"]


def tiny_model(levels=2, prior="vamp", seed=0, **overrides) -> HVAE:
    torch.manual_seed(seed)
    return HVAE(HVAEConfig(levels=levels, prior=prior, **{**TINY, **overrides})).eval()


def binary_images(n, seed=0) -> torch.Tensor:
    """[n, 3, 8, 8] binary images (±1), grey replicated."""
    grey = torch.bernoulli(torch.full((n, 1, 8, 8), 0.3), generator=torch.Generator().manual_seed(seed))
    return (2 * grey - 1).expand(n, 3, 8, 8)


# ---------------------------------------------------------------------------------------------
# The mixture density and its noise map.


def test_mixture_log_prob_equals_brute_force_mixture():
    generator = torch.Generator().manual_seed(0)
    mu, sigma = torch.randn(7, 4, generator=generator), torch.rand(7, 4, generator=generator) + 0.2
    z = 2 * torch.randn(50, 4, generator=generator)
    components = torch.distributions.Independent(torch.distributions.Normal(mu.double(), sigma.double()), 1)
    density = components.log_prob(z.double()[:, None, :]).exp().mean(dim=1)  # (1/K) Σ_k N(z; μ_k, σ_k²)
    assert torch.allclose(vampprior.mixture_log_prob(z, mu, sigma).double(), density.log(), atol=1e-4)
    assert torch.allclose(vampprior.mixture_log_prob(z, mu, sigma, chunk=30), vampprior.mixture_log_prob(z, mu, sigma))
    marginal = torch.distributions.Normal(mu.double(), sigma.double()).log_prob(z.double()[:, None, :]).exp().mean(1)
    assert torch.allclose(vampprior.marginal_log_probs(z, mu, sigma).double(), marginal.log(), atol=1e-4)


def test_component_noise_is_uniform_and_invertible():
    generator = torch.Generator().manual_seed(1)
    counts = torch.bincount(vampprior.select_component(torch.randn(40_000, 1, generator=generator), 8), minlength=8)
    assert counts.min() > 4_600 and counts.max() < 5_400  # 5,000 expected, std ≈ 66
    mu, sigma = torch.randn(8, 3, generator=generator), torch.rand(8, 3, generator=generator) + 0.1
    eps_z, eps_k = torch.randn(100, 3, generator=generator), torch.randn(100, 1, generator=generator)
    z = vampprior.sample(eps_z, eps_k, mu, sigma, temperature=0.7)
    back_z, back_k = vampprior.invert(z, mu, sigma, temperature=0.7)
    assert torch.allclose(vampprior.sample(back_z, back_k, mu, sigma, temperature=0.7), z, atol=1e-5)
    with pytest.raises(ValueError, match="Langevin"):
        vampprior.sample(eps_z, eps_k.clone().requires_grad_(True), mu, sigma)


# ---------------------------------------------------------------------------------------------
# The models.


@pytest.mark.parametrize("levels, prior", [(1, "standard"), (1, "vamp"), (2, "standard"), (2, "vamp")])
def test_api_shapes_and_training_terms(levels, prior):
    model = tiny_model(levels, prior).train()
    out = model(torch.rand(6, 3, 8, 8) * 2 - 1)  # grey input: binarized inside
    assert out.x_mean.shape == out.x_log_sigma.shape == (6, 3, 8, 8) and out.recon_log_prob.shape == (6,)
    assert len(out.kl_per_group) == len(out.z) == levels and all(k.shape == (6,) for k in out.kl_per_group)
    assert [c.shape for c in out.kl_per_channel] == [(3,)] * levels
    assert torch.all(out.recon_log_prob < 0) and torch.all(out.x_mean.abs() <= 1)
    assert model.latent_shapes == [(3,)] * levels + ([(1,)] if prior == "vamp" else [])
    (-(out.recon_log_prob - sum(out.kl_per_group)).mean()).backward()
    if prior == "vamp":  # the pseudo-inputs are learned through the KL term
        assert model.vamp.raw.grad is not None and model.vamp.raw.grad.abs().sum() > 0
    generation = model.sample(5, generator=torch.Generator().manual_seed(0))
    assert generation.x_sample.shape == (5, 3, 8, 8) and set(generation.x_sample.unique().tolist()) <= {-1.0, 1.0}


@pytest.mark.parametrize("prior", ["standard", "vamp"])
def test_noise_round_trips(prior):
    model = tiny_model(2, prior)
    generator = torch.Generator().manual_seed(2)
    eps = [torch.randn(16, *shape, generator=generator) for shape in [*model.latent_shapes, model.image_shape]]
    with torch.no_grad():
        generation = model.decode(eps[:-1], eps[-1], temperature=0.8)
        if prior == "standard":  # the exact map of README, Design: z2 = t·ε_z2, z1 = μ(z2) + t·σ(z2)·ε_z1
            mu1, sigma1 = model.p_z1(generation.z[0])
            assert torch.allclose(generation.z[0], 0.8 * eps[0])
            assert torch.allclose(generation.z[1], mu1 + 0.8 * sigma1 * eps[1], atol=1e-6)
        eps_z, eps_x = model.latents_to_noise(generation.z, generation.x_sample, temperature=0.8)
        again = model.decode(eps_z, eps_x, temperature=0.8)
        for a, b in zip(again.z, generation.z):
            assert torch.allclose(a, b, atol=1e-5)
        assert torch.equal(again.x_sample, generation.x_sample)
        if prior == "standard":
            for a, b in zip(eps_z, eps[:-1]):
                assert torch.allclose(a, b, atol=1e-5)
        # posterior_noise: decoding its noise gives back the posterior sample and the data.
        x = binary_images(16)
        posterior_eps = [torch.randn(16, *s, generator=generator) for s in model.latent_shapes]
        eps_z, eps_x, log_w = model.posterior_noise(x, posterior_eps)
        decoded = model.decode(eps_z, eps_x)
        assert torch.equal(decoded.x_sample, x) and log_w.shape == (16,) and torch.all(log_w < 0)
        mu2, sigma2 = model.q_top(model.binarize(x))
        assert torch.allclose(decoded.z[0], mu2 + sigma2 * posterior_eps[0], atol=1e-5)


def test_noise_space_langevin_is_refused_where_undefined_and_exact_elsewhere():
    standard, vamp = tiny_model(2, "standard"), tiny_model(2, "vamp")
    eps_z = [torch.randn(4, *s, dtype=torch.float64).requires_grad_(True) for s in standard.latent_shapes]
    standard = standard.double()
    energy = lambda eps: standard.decode(eps, None).x_mean.sum()  # latent tilting / joint prior: ε_z only
    grads = torch.autograd.grad(energy(eps_z), eps_z)
    # The gradient Langevin follows is the derivative: central differences along a random direction agree.
    direction = [torch.randn(e.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
                 for i, e in enumerate(eps_z)]
    h = 1e-5
    with torch.no_grad():
        shifted = lambda sign: [e + sign * h * d for e, d in zip(eps_z, direction)]
        numeric = (energy(shifted(1)) - energy(shifted(-1))) / (2 * h)
    analytic = sum((g * d).sum() for g, d in zip(grads, direction))
    assert all(g.abs().sum() > 0 for g in grads)
    assert abs(float(numeric - analytic)) < 1e-6 * max(1.0, abs(float(analytic)))
    with pytest.raises(ValueError, match="Langevin"):  # VAEBM moves ε_x: a step function here
        standard.decode([e.detach() for e in eps_z], torch.randn(4, 3, 8, 8).requires_grad_(True))
    with pytest.raises(ValueError, match="Langevin"):
        vamp.decode([torch.randn(4, *s).requires_grad_(True) for s in vamp.latent_shapes], None)


@pytest.mark.parametrize("prior", ["standard", "vamp"])
def test_importance_sampling_matches_the_exact_likelihood(prior):
    """One latent unit: log p(x) = log ∫ p(x|z) p(z) dz by quadrature, against IS and the ELBO."""
    model = tiny_model(1, prior, seed=3, latent_dim=1)
    with torch.no_grad():
        model.p_x_logits.weight.mul_(8.0)  # a decoder that depends on z: a peaked posterior the encoder misses
    x = binary_images(6, seed=4)
    b = model.binarize(x)
    with torch.no_grad():
        grid = torch.linspace(-12, 12, 6001)[:, None]  # [G, 1]
        log_px_z = -torch.nn.functional.binary_cross_entropy_with_logits(
            model.decoder_logits([grid])[:, None, :].expand(-1, 6, -1), b.expand(6001, -1, -1), reduction="none").sum(-1)
        if prior == "standard":
            log_pz = -0.5 * grid[:, 0] ** 2 - 0.5 * math.log(2 * math.pi)
        else:
            log_pz = vampprior.mixture_log_prob(grid, *model.prior_components())
        assert torch.allclose(model.prior_log_prob([grid]), log_pz, atol=1e-5)
        exact = torch.logsumexp(log_px_z + log_pz[:, None], dim=0) + math.log(24 / 6000)  # [6]
        generator = torch.Generator().manual_seed(5)
        iwae = model.log_likelihood(x, 4000, generator=generator)
        elbo = torch.stack([model.log_likelihood(x, 1, generator=generator) for _ in range(500)]).mean(0)
        torch.manual_seed(6)
        forward_elbo = torch.stack([(lambda o: o.recon_log_prob - o.kl_per_group[0])(model(x)) for _ in range(500)]).mean(0)
    assert torch.allclose(iwae, exact, atol=0.05), (iwae, exact)
    assert torch.all(elbo < exact + 0.05)
    assert (exact - elbo).mean() > 0.5  # the bound is loose for a random encoder: IS has much to gain
    # The training objective (analytic or MC KL) is the same ELBO: means agree within ~3 standard errors.
    assert abs(forward_elbo.mean() - elbo.mean()) < 0.15


def test_more_importance_samples_tighten_the_bound():
    model = tiny_model(2, "vamp", seed=6)
    x, generator = binary_images(32, seed=7), torch.Generator().manual_seed(8)
    with torch.no_grad():
        one = torch.stack([model.log_likelihood(x, 1, generator=generator) for _ in range(50)]).mean()
        ten = torch.stack([model.log_likelihood(x, 10, generator=generator) for _ in range(20)]).mean()
        many = model.log_likelihood(x, 500, batch=997, generator=generator).mean()  # chunked: 31 samples a chunk
    assert one < ten < many


def test_test_images_are_binarized_once():
    from trainer.evaluation.vampprior import binarized_test_images

    x = binarized_test_images(8, 20, seed=0)
    assert x.shape == (20, 3, 8, 8) and set(x.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(x, x[:, :1].expand_as(x)) and torch.equal(x, binarized_test_images(8, 20, seed=0))
    model = tiny_model(1, "standard")
    assert torch.equal(model.binarize(x), (x[:, 0].flatten(1) + 1) / 2)  # a binary image is never re-binarized


def test_active_units_statistic_and_config_errors():
    model = tiny_model(2, "standard")
    with torch.no_grad():
        model.q_top[1].mean.weight.zero_()  # z2's posterior mean no longer depends on x: no active unit there
    means = model.posterior_means(binary_images(40), num_samples=4)
    assert [m.shape for m in means] == [(40, 3), (40, 3)]
    assert means[0].var(dim=0).max() < 1e-10 and means[1].var(dim=0).max() > 1e-4
    for field, value in [("levels", 3), ("prior", "mog"), ("pseudo_init", "zeros"), ("hidden", 0),
                         ("min_log_var", 5.0)]:
        with pytest.raises(ValueError, match=f"^{field}"):
            HVAEConfig(**{field: value}).validate()


# ---------------------------------------------------------------------------------------------
# Through the project's scripts.


@pytest.mark.slow
def test_train_resume_export_and_sample(tmp_path, cache_dir):
    import models

    run_dir = tmp_path / "run"
    common = ["--config", "vamp-digits", "--run-dir", str(run_dir), f"data.cache_dir={cache_dir}", *TINY_RUN,
              "optim.lr=1e-7", "optim.lr_min=0", "optim.warmup_steps=0"]
    run_script("train_nvae.py", *common, "train.max_steps=3")
    run_script("train_nvae.py", *common, "train.max_steps=5")  # resumes from step 3
    rows = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and "resuming from step 3" in (run_dir / "log.txt").read_text()
    assert all(math.isfinite(r["nelbo"]) and r["kl"] != 0 for r in rows)
    # pseudo_init=data: with a negligible learning rate the pseudo-inputs are still training images.
    from data.bundled import load_digits_split
    from trainer.export import export_run
    from trainer.run.checkpoint import Checkpoint

    state = Checkpoint(latest_checkpoint(run_dir)).tensors("ema.safetensors")
    pseudo = torch.sigmoid(state["vamp.raw"])  # [6, 64]
    images, _ = load_digits_split("train", 8)
    grey = torch.from_numpy(images[..., 0]).float().flatten(1).div(255).clamp(0.02, 0.98)  # [N, 64]
    nearest = (pseudo[:, None, :] - grey[None]).abs().amax(dim=-1).min(dim=1).values  # [6] max-abs distance
    assert nearest.max() < 1e-4

    export_run(run_dir, tmp_path / "bundle", log=lambda message: None)  # what scripts/export.py runs
    sampler = models.load_bundle(tmp_path / "bundle")
    assert json.loads((tmp_path / "bundle" / "bundle.json").read_text())["vae"]["type"] == "hvae"
    images = sampler.sample(6, seed=0, steps=0)
    assert images.shape == (6, 3, 8, 8) and images.dtype == torch.uint8
    assert torch.equal(images, sampler.sample(6, seed=0, steps=0, batch_size=4))  # image i depends on (seed, i)


@pytest.mark.slow
def test_evaluate_vampprior_end_to_end(tmp_path, cache_dir):
    out = tmp_path / "vampprior.json"
    run_script("evaluate.py", "vampprior", "--out", str(out), "--run-dir", str(tmp_path / "eval"), "--steps", "2",
               "--is-samples", "3", "--test-points", "5", "--elbo-draws", "2", "--au-samples", "2",
               *[f"--override={o}" for o in [f"data.cache_dir={cache_dir}", *TINY_RUN]])
    result = json.loads(out.read_text())
    for name in ("vae_standard", "vae_vamp", "hvae_standard", "hvae_vamp"):
        assert all(math.isfinite(result[f"{name}_{k}"]) and result[f"{name}_{k}"] < 0 for k in ("ll", "ll_tenth", "elbo"))
    for key in ("vae_standard_active_units", "vae_vamp_active_units", "hvae_standard_active_units_z1",
                "hvae_standard_active_units_z2", "hvae_vamp_active_units_z1", "hvae_vamp_active_units_z2"):
        assert 0 <= result[key] <= 4
    assert result["hvae_vamp_gain"] == pytest.approx(result["hvae_vamp_ll"] - result["hvae_standard_ll"])
    assert (result["test_points"], result["is_samples"], result["train_steps"]) == (5, 3, 2)
    assert (tmp_path / "eval" / "pseudo_inputs_hvae_vamp.png").is_file()


@pytest.mark.parametrize("method", ["latent-tilting", "joint-prior"])
def test_hvae_vampprior_langevin_holds_the_component(method):
    """Latent-space Langevin on a VampPrior HVAE moves ε_z2, ε_z1 and keeps each chain's component ε_k."""
    from models.adapters import build_adapter
    from models.energy import EnergyNetConfig, build_energy
    from models.langevin import PerChainNoise, langevin

    model = tiny_model(levels=2, prior="vamp").requires_grad_(False)
    if method == "joint-prior":
        energy = build_energy(EnergyNetConfig(kind="latent", hidden=8, depth=1), model.z_shapes)
    else:
        energy = lambda x: x.flatten(1).square().sum(1)  # an energy on the decoder mean
    adapter = build_adapter(method, model, energy)
    assert adapter.held_noise == (2,) and len(adapter.chain_shapes) == 3
    source = PerChainNoise([1, 2, 3])
    start = source.initial(adapter.chain_shapes)
    result = langevin(start, adapter, 3, 0.05, source)
    assert torch.equal(result.noise[2], start[2])
    assert not torch.equal(result.noise[0], start[0]) and not torch.equal(result.noise[1], start[1])
    with torch.no_grad():  # the first step's reported energy is the energy of the starting noise
        torch.testing.assert_close(result.energy[0], adapter(start).float().mean(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="Langevin"):  # moving the selector is refused
        langevin(start, adapter, 1, 0.05, source, held=())
