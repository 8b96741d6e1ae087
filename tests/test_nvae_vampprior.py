"""The VampPrior as the prior of the NVAE's top latent group (model.prior=vamp; models/nvae/model.py,
models/vampprior.py): densities, one BN pass for data and pseudo-images, the ε ↔ z maps with the component
selector ε_k, Langevin that holds each chain's component, and the trainer end to end. CPU, tiny configs."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
from conftest import FAST, run_script

from models import vampprior
from models.adapters import build_adapter
from models.energy import EnergyNetConfig, MLPEnergy, build_energy
from models.langevin import PerChainNoise, langevin
from models.nvae import NVAE, NVAEConfig
from models.nvae.bn_stats import GENERATIVE_PREFIXES
from models.nvae.distributions import Normal
from trainer.ebm.replay import ReplayBuffer
from trainer.nvae.objective import kl_balance_alphas, nvae_loss
from trainer.run.checkpoint import latest_checkpoint

# Tiny but complete (as tests/test_nvae_model.py): 2 scales × 2 groups, flows, SE, residual posterior.
TINY = NVAEConfig(
    image_size=16, in_channels=3, channels_enc=8, channels_dec=8, num_latent_scales=2, groups_per_scale=2,
    latents_per_group=4, cells_per_cond_enc=1, cells_per_cond_dec=1, num_flows=1,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(prior: str = "vamp", pseudo_inputs: int = 3, seed: int = 0, **changes) -> NVAE:
    torch.manual_seed(seed)
    return NVAE(TINY.replace(prior=prior, pseudo_inputs=pseudo_inputs, **changes))


def images(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 16, 16), generator=g).float() / 127.5 - 1.0


def randomize_bn(model: NVAE, seed: int = 3) -> None:
    """Non-trivial running statistics, so eval-mode encodings depend on them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.bn_layers(generative_only=False):
            layer.running_mean.copy_(0.3 * torch.randn(layer.running_mean.shape, generator=g))
            layer.running_var.copy_(0.5 + torch.rand(layer.running_var.shape, generator=g))


def separate_components(model: NVAE) -> None:
    """At initialization the pseudo-images encode to nearly the same Gaussian; spread the means and shrink
    the σ's (0.08) of the top group's posterior so every z_0 = μ_k + t·σ_k·ε has k as its most responsible
    component."""
    conv, latents = model.enc_samplers[0], model.cfg.latents_per_group
    with torch.no_grad():
        conv.log_weight_norm[:latents] += math.log(30.0)
        conv.log_weight_norm[latents:] -= 10.0
        conv.bias[latents:] = -3.0


def standard_twin(model: NVAE) -> NVAE:
    """A standard-prior NVAE with the same weights (everything but the pseudo-inputs)."""
    twin = NVAE(model.cfg.replace(prior="standard"))
    twin.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("vamp.")})
    return twin.train(model.training)


def noise(model: NVAE, n: int, seed: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((n, *shape), generator=g) for shape in model.latent_shapes]


class SquaredNorm(nn.Module):
    """A stand-in energy on images: E(x) = ‖x‖² [B]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).square().sum(1)


def encoder_statistics(model: NVAE) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.bn_statistics(generative_only=False).items() if not k.startswith(GENERATIVE_PREFIXES)}


# ---------------------------------------------------------------------------------------------
# Config and shapes.


def test_config_names_the_key_and_standard_prior_is_unchanged():
    for field, value in (("prior", "vampprior"), ("pseudo_init", "zeros"), ("pseudo_inputs", 0)):
        with pytest.raises(ValueError, match=f"'{field}'"):
            TINY.replace(**{field: value}).validate()
    standard, vamp = tiny("standard"), tiny("vamp")
    assert standard.vamp is None and not any(k.startswith("vamp.") for k in standard.state_dict())
    assert standard.latent_shapes == standard.z_shapes and standard.held_noise == ()
    assert vamp.latent_shapes == [*vamp.z_shapes, (1,)] and vamp.held_noise == (vamp.num_groups,)
    assert vamp.vamp.raw.shape == (3, 3, 16, 16) and vamp.pseudo_inputs_from_data == 3
    # The pseudo-inputs are built last: every other initial weight is the standard model's.
    assert all(torch.equal(v, vamp.state_dict()[k]) for k, v in standard.state_dict().items())


def test_preset_resolves_to_an_nvae_with_the_vampprior():
    from trainer.config.loader import load_config
    from trainer.config.nvae import NVAETrainingConfig, architecture_dict
    from trainer.errors import UserError

    cfg = load_config(NVAETrainingConfig, "nvae", "vamp-top-digits16", expand={"model": architecture_dict})
    assert isinstance(cfg.model, NVAEConfig)
    assert (cfg.model.prior, cfg.model.pseudo_inputs, cfg.model.pseudo_init, cfg.model.image_size) == ("vamp", 50, "data", 16)
    with pytest.raises(UserError, match="prior"):
        load_config(NVAETrainingConfig, "nvae", "vamp-top-digits16", ["model.prior=mixture"],
                    expand={"model": architecture_dict})


# ---------------------------------------------------------------------------------------------
# (a) Densities.


def test_one_component_is_the_gaussian_of_the_encoded_pseudo_input():
    model = tiny(pseudo_inputs=1)
    randomize_bn(model)
    model.eval()
    twin = standard_twin(model).eval()
    with torch.no_grad():
        # The component, by hand: the pseudo-image through the encoder and the top group's sampler.
        top, _ = model._encode(model.vamp.pseudo_inputs())
        component = Normal.from_params(model.enc_samplers[0](top))
        mu, sigma = model.prior_components()
        assert torch.allclose(mu, component.mu.flatten(1)) and torch.allclose(sigma, component.sigma.flatten(1))

        z = model.decode(noise(model, 4)).z
        gaussian = component.log_prob(z[0]).sum(dim=(1, 2, 3))
        standard_top = Normal.standard(z[0]).log_prob(z[0]).sum(dim=(1, 2, 3))
        # log p_vamp(z) = log N(z_0; μ_1, σ_1²) + the same lower groups as the standard model.
        assert torch.allclose(model.prior_log_prob(z) - twin.prior_log_prob(z), gaussian - standard_top, atol=1e-3)
        assert torch.allclose(vampprior.mixture_log_prob(z[0].flatten(1), mu, sigma), gaussian, atol=1e-3)

        # The training pass: same posterior sample, so KL_vamp − KL_std = log N(z_0; 0, 1.01²) − log N(z_0; μ_1, σ_1²).
        x, eps = images(4), noise(model, 4, seed=9)
        out, out_std = model(x, posterior_eps=eps), twin(x, posterior_eps=eps[:-1])
        assert torch.equal(out.z[0], out_std.z[0])
        expected = standard_top_of(out.z[0]) - component.log_prob(out.z[0]).sum(dim=(1, 2, 3))
        assert torch.allclose(out.kl_per_group[0] - out_std.kl_per_group[0], expected, atol=1e-3)
        for g in range(1, model.num_groups):  # the lower groups are untouched
            assert torch.allclose(out.kl_per_group[g], out_std.kl_per_group[g])


def standard_top_of(z0: torch.Tensor) -> torch.Tensor:
    return Normal.standard(z0).log_prob(z0).sum(dim=(1, 2, 3))


# ---------------------------------------------------------------------------------------------
# (b) The top-group KL in training.


def test_top_group_kl_is_finite_balanced_and_trains_the_pseudo_inputs():
    model = tiny().train()
    out = model(images(6))
    assert [kl.shape for kl in out.kl_per_group] == [(6,)] * model.num_groups
    assert [c.shape for c in out.kl_per_channel] == [(4,)] * model.num_groups
    assert all(torch.isfinite(kl).all() for kl in out.kl_per_group)
    # The loss the trainer computes (KL balancing during the warm-up) takes it as it is.
    loss, terms = nvae_loss(out, 0.5, kl_balance_alphas(model.groups_per_scale_decoder_order), 0.1,
                            model.spectral_loss(), model.bn_loss())
    assert math.isfinite(float(loss.detach())) and float(terms["kl"]) == pytest.approx(
        float(torch.stack(out.kl_per_group, 1).sum(1).mean().detach()), rel=1e-5)
    (grad,) = torch.autograd.grad(out.kl_per_group[0].mean(), [model.vamp.raw])
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # prior_log_prob (the joint prior's generator fine-tuning) reaches them too.
    (grad,) = torch.autograd.grad(model.prior_log_prob([z.detach() for z in out.z]).sum(), [model.vamp.raw])
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_top_group_monte_carlo_kl_averages_to_the_analytic_kl_for_one_component():
    """K = 1: the VampPrior is one Gaussian N(μ_1, σ_1²), so the training pass's one-sample KL of the top group,
    log q(z_0|x) − log p(z_0), averages over posterior draws to the closed-form KL between two Gaussians."""
    model = tiny(pseudo_inputs=1, num_flows=0)
    randomize_bn(model)
    separate_components(model)  # a data image and the pseudo-image then encode to clearly different Gaussians
    model.eval()
    draws = 2000
    x = images(1).expand(draws, -1, -1, -1)
    with torch.no_grad():
        kl_mc = model(x, posterior_eps=noise(model, draws, seed=11)).kl_per_group[0].double()
        top, _ = model._encode(model.quantize(x[:1]))
        q = Normal.from_params(model.enc_samplers[0](top))
        mu_q, sigma_q = q.mu.flatten(1).double(), q.sigma.flatten(1).double()
        mu_p, sigma_p = (t.double() for t in model.prior_components())
    kl = torch.log(sigma_p / sigma_q) + (sigma_q ** 2 + (mu_q - mu_p) ** 2) / (2 * sigma_p ** 2) - 0.5
    analytic = float(kl.sum())
    stderr = float(kl_mc.std() / draws ** 0.5)
    assert abs(float(kl_mc.mean()) - analytic) < 4 * stderr + 1e-3, (float(kl_mc.mean()), analytic, stderr)
    assert analytic > 10 * stderr  # a KL the estimate could miss


# ---------------------------------------------------------------------------------------------
# (c) One BN pass for data and pseudo-images.


def test_pseudo_images_and_data_share_one_bn_pass():
    model = tiny().train()
    x = images(5)
    u = model.vamp.pseudo_inputs().detach()
    joint, separate = standard_twin(model).train(), standard_twin(model).train()
    with torch.no_grad():
        model(x)
        joint._encode(torch.cat([model.quantize(x), u]))  # one batch of B + K
        separate._encode(model.quantize(x))  # two batches: what a separate pass would give
        separate._encode(u)
    ours, one_pass, two_passes = encoder_statistics(model), encoder_statistics(joint), encoder_statistics(separate)
    assert ours.keys() == one_pass.keys() and len(ours) > 0
    assert all(torch.allclose(ours[k], one_pass[k], atol=1e-6) for k in ours)
    assert any(not torch.allclose(ours[k], two_passes[k], atol=1e-4) for k in ours)
    # Generation encodes the pseudo-images with the running statistics and never moves them, even in train mode.
    before = model.bn_statistics(generative_only=False)
    with torch.no_grad():
        model.prior_components()
    after = model.bn_statistics(generative_only=False)
    assert all(torch.equal(before[k], after[k]) for k in before) and model.training
    assert all(layer.training for _, layer in model.bn_layers(generative_only=False))


# ---------------------------------------------------------------------------------------------
# (d) Noise ↔ latents.


def test_decoding_with_fixed_selector_is_deterministic_and_inverts():
    model = tiny(pseudo_inputs=4)
    randomize_bn(model)
    separate_components(model)
    model.eval()
    with torch.no_grad():
        mu, sigma = model.prior_components()
        eps = noise(model, 6)
        eps_x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(2))
        for t in (1.0, 0.7):
            first, second = model.decode(eps, eps_x, t), model.decode(eps, eps_x, t)
            assert torch.equal(first.x_sample, second.x_sample) and all(torch.equal(a, b) for a, b in zip(first.z, second.z))
            k = vampprior.select_component(eps[-1], 4)
            assert torch.allclose(first.z[0].flatten(1), mu[k] + t * sigma[k] * eps[0].flatten(1), atol=1e-6)
            # latents_to_noise ∘ decode: the same ε (the component too) and decoding it reproduces (z, x).
            back, back_x = model.latents_to_noise(first.z, first.x_sample, t)
            assert len(back) == len(model.latent_shapes)
            assert torch.equal(vampprior.select_component(back[-1], 4), k)
            assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(back[:-1], eps[:-1]))
            assert torch.allclose(back_x, eps_x, atol=1e-3)
            again = model.decode(back, back_x, t)
            assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(again.z, first.z))
            assert torch.allclose(again.x_sample, first.x_sample, atol=1e-5)
        # Another selector picks another component: z_0 moves by μ_k' − μ_k.
        other = [e.clone() for e in eps]
        other[-1] = vampprior.selector_noise((k + 1) % 4, 4, eps[-1])
        assert not torch.allclose(model.decode(other).z[0], first.z[0])
        # encode_noise: decode(ε(x)) gives back x and the posterior z.
        x = images(3)
        eps_z, eps_x = model.encode_noise(x, generator=torch.Generator().manual_seed(4))
        assert len(eps_z) == len(model.latent_shapes) and eps_z[-1].shape == (3, 1)
        assert torch.allclose(model.decode(eps_z, eps_x).x_sample, model.quantize(x), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# (e) Langevin holds each chain's component.


class Recording:
    """An adapter wrapper that records the selector it is called with (and passes held_noise on)."""

    def __init__(self, adapter, index: int):
        self.adapter, self.index, self.seen = adapter, index, []
        self.held_noise = adapter.held_noise

    def __call__(self, noise):
        self.seen.append((noise[self.index].detach().clone(), noise[self.index].requires_grad))
        return self.adapter(noise)


@pytest.mark.parametrize("method", ["vaebm", "latent-tilting", "joint-prior"])
def test_langevin_holds_the_component_and_moves_the_rest(method):
    model = tiny(pseudo_inputs=4).eval().requires_grad_(False)
    energy = build_energy(EnergyNetConfig(kind="latent", hidden=8, depth=1), model.z_shapes) \
        if method == "joint-prior" else SquaredNorm()
    adapter = build_adapter(method, model, energy)
    index = model.num_groups
    assert adapter.held_noise == (index,)
    source = PerChainNoise([11, 12, 13, 14, 15])
    start = source.initial(adapter.chain_shapes)
    recording = Recording(adapter, index)
    result = langevin(start, recording, 3, 0.05, source)
    assert len(recording.seen) == 3
    assert all(torch.equal(seen, start[index]) and not grad for seen, grad in recording.seen)
    assert torch.equal(result.noise[index], start[index])
    assert all(not torch.equal(a, b) for i, (a, b) in enumerate(zip(result.noise, start)) if i != index)
    assert torch.isfinite(result.grad_norm).all()
    with torch.no_grad():  # the first step's reported energy is the energy of the starting noise
        torch.testing.assert_close(result.energy[0], adapter(start).float().mean(), rtol=1e-5, atol=1e-5)
    # Moving the selector is refused: z is piecewise constant in it.
    with pytest.raises(ValueError, match="Langevin"):
        langevin(start, adapter, 1, 0.05, source, held=())


def test_training_chains_and_bundle_sampler_keep_the_component():
    from models.sampler import BundleSampler
    from trainer.config.ebm import LangevinConfig
    from trainer.ebm.negatives import negative_samples
    from trainer.run.collective import BatchRows

    model = tiny(pseudo_inputs=4).eval().requires_grad_(False)
    adapter = build_adapter("vaebm", model, MLPEnergy(3 * 16 * 16, hidden=8, depth=1).requires_grad_(False))
    index = model.num_groups
    config = LangevinConfig(steps=2, step_size=0.05)
    generator = torch.Generator().manual_seed(0)
    fresh = adapter.initial_noise(4, torch.Generator().manual_seed(0), "cpu")  # what negative_samples draws first
    chains, negatives = negative_samples(adapter, None, 4, 0.0, generator, config, rows=BatchRows(0, 4, 4))
    assert torch.equal(chains.noise[index], fresh[index]) and negatives.shape == (4, 3, 16, 16)
    # Persistent chains: the replay buffer stores ε_k with the rest of ε_z, so a restarted chain keeps it.
    buffer = ReplayBuffer(model.latent_shapes, capacity=8)
    buffer.push(adapter.latent_noise(chains.noise))
    restarted, _ = negative_samples(adapter, buffer, 4, 1.0, generator, config)
    stored = {float(v) for v in chains.noise[index].flatten()}
    assert {float(v) for v in restarted.noise[index].flatten()} <= stored

    manifest = {"kind": "vaebm", "sampling": {"steps": 2, "step_size": 0.05, "temperature": 1.0},
                "energy": {"method": "latent-tilting"}}
    sampler = BundleSampler(model, SquaredNorm(), manifest, path=".")
    first = sampler.sample_indices([0, 1, 2], seed=7)
    again = sampler.sample_indices([1, 2], seed=7)  # chain i depends on (seed, i) only
    assert first.mean.shape == (3, 3, 16, 16) and torch.isfinite(first.mean).all()
    assert torch.allclose(first.mean[1:], again.mean, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# (f) Through the project's scripts.


@pytest.mark.slow
def test_train_resume_and_export(tmp_path, cache_dir):
    import models
    from trainer.export import export_run
    from trainer.run.checkpoint import Checkpoint

    run_dir = tmp_path / "run"
    common = ["--config", "vamp-top-digits16", "--run-dir", str(run_dir), f"data.cache_dir={cache_dir}", *FAST,
              "model.pseudo_inputs=4", "train.log_every=1", "optim.lr=1e-7", "optim.lr_min=0", "optim.warmup_steps=0"]
    run_script("train_nvae.py", *common, "train.max_steps=2")
    run_script("train_nvae.py", *common, "train.max_steps=3")  # resumes from step 2
    rows = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and "resuming from step 2" in (run_dir / "log.txt").read_text()
    assert all(math.isfinite(r["nelbo"]) and math.isfinite(r["kl"]) for r in rows)

    # pseudo_init=data: with a negligible learning rate the pseudo-images are still training images.
    from data.bundled import load_digits_split

    state = Checkpoint(latest_checkpoint(run_dir)).tensors("ema.safetensors")
    pseudo = 2.0 * torch.sigmoid(state["vamp.raw"]) - 1.0  # [4, 3, 16, 16] in (−1, 1)
    digits, _ = load_digits_split("train", 16)
    data = torch.from_numpy(digits).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).clamp(-0.96, 0.96)
    nearest = (pseudo.flatten(1)[:, None] - data.flatten(1)[None]).abs().amax(dim=-1).min(dim=1).values
    assert nearest.max() < 1e-3

    export_run(run_dir, tmp_path / "bundle", temperatures=[1.0], bn_passes=2, bn_batch_size=4, log=lambda message: None)
    sampler = models.load_bundle(tmp_path / "bundle")
    assert sampler.vae.cfg.prior == "vamp" and sampler.noise_shapes[-2] == (1,)
    samples = sampler.sample(5, seed=0, steps=0)
    assert samples.shape == (5, 3, 16, 16) and samples.dtype == torch.uint8
    assert torch.equal(samples, sampler.sample(5, seed=0, steps=0, batch_size=2))
