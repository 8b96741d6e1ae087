"""NVAE model: structure against the official layout, the ε ↔ (z, x) maps, regularizers, BN
statistics, gradient checkpointing, quantization. CPU, small configs."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from models.layers import Conv2d
from models.nvae import ARCHITECTURES, NVAE, NVAEConfig, get_architecture
from models.nvae.distributions import Normal
from models.nvae.flows import AutoregressiveShift, PairedFlow
from models.spectral import collect_convs

# Tiny but complete: 2 scales, 2 groups each, flows, SE, residual posterior, 5-bit input.
TINY = NVAEConfig(
    image_size=16, in_channels=3, channels_enc=8, channels_dec=8, num_latent_scales=2, groups_per_scale=2,
    latents_per_group=4, cells_per_cond_enc=1, cells_per_cond_dec=1, num_flows=1,
)

# Whole-model parameter counts of the official VAEBM backbones (tests/fixtures/official-state-dicts.json), with
# the numbers of spectrally regularized convs and BN layers.
OFFICIAL = {
    "cifar10": (130_744_004, 610, 364),
    "celeba64": (65_005_372, 330, 196),  # lsun_church64 is the same architecture (checked below)
    "celebahq256": (365_372_032, 570, 268),
    "nvae-bench-small": (5_823_432, None, None),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: 2 threads thrash on a shared 2-core box


def _tiny(seed: int = 0, **changes) -> NVAE:
    torch.manual_seed(seed)
    return NVAE(TINY.replace(**changes))


def _images(n: int, cfg: NVAEConfig, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, 256, (n, cfg.in_channels, cfg.image_size, cfg.image_size), generator=g)
    return levels.float() / 127.5 - 1.0


def _randomize_bn(model: nn.Module, seed: int = 3) -> None:
    """Non-trivial BN statistics and affine params, so eval-mode tests exercise them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(1 + 0.1 * torch.randn(m.num_features, generator=g))


# ----------------------------------------------------------------------------------------------
# Structure.


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_parameter_counts_match_official(name):
    with torch.device("meta"):
        model = NVAE(ARCHITECTURES[name])
    params = sum(p.numel() for p in model.parameters())
    expected, convs, bns = OFFICIAL[name]
    assert abs(params - expected) <= 0.10 * expected, (name, params, expected)
    assert params == expected  # in fact identical, which pins the whole layout
    if convs is not None:
        assert len(collect_convs(model)) == convs
        assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == bns


def test_lsun_church_shares_the_celeba64_architecture():
    assert ARCHITECTURES["lsun_church64"] == ARCHITECTURES["celeba64"]


@pytest.mark.parametrize("name", ["digits", "nvae-bench-small"])
def test_forward_and_decode_shapes(name):
    cfg = get_architecture(name)
    torch.manual_seed(0)
    model = NVAE(cfg)
    x = _images(2, cfg)
    out = model(x)
    assert out.x_mean.shape == out.x_log_sigma.shape == x.shape
    assert out.recon_log_prob.shape == (2,)
    assert len(out.kl_per_group) == len(out.z) == len(out.kl_per_channel) == model.num_groups
    assert model.num_groups == sum(model.groups_per_scale_decoder_order)
    for z, kl, kl_c, shape in zip(out.z, out.kl_per_group, out.kl_per_channel, model.latent_shapes):
        assert z.shape == (2, *shape) and kl.shape == (2,) and kl_c.shape == (shape[0],)
    sizes = [s[1] for s in model.latent_shapes]
    assert sizes == sorted(sizes) and sizes[0] == cfg.top_resolution  # top (lowest resolution) first
    gen = model.eval().sample(3)
    assert gen.x_sample.shape == (3, *model.image_shape) and [z.shape[1:] for z in gen.z] == model.latent_shapes


def test_every_conv_is_the_shared_conv_class():
    model = _tiny()
    raw = [m for m in model.modules() if isinstance(m, nn.Conv2d) and not isinstance(m, Conv2d)]
    assert raw == []
    assert model.spectral.num_layers == len(collect_convs(model))


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="image_size"):
        NVAE(TINY.replace(image_size=18))
    with pytest.raises(ValueError, match="num_x_bits"):
        TINY.replace(num_x_bits=9).validate()
    with pytest.raises(ValueError, match="postprocess_blocks"):
        TINY.replace(postprocess_blocks=2).validate()
    assert get_architecture("celeba64").replace(ada_groups=True, groups_per_scale=20).groups_per_scale_decoder_order() == [5, 10, 20]


FIXTURE = Path(__file__).parent / "fixtures" / "official-format"


def test_generative_path_reproduces_official_outputs():
    """Official weights (renamed) + the fixture's noise → the official z's and decoder outputs."""
    import argparse

    from safetensors.torch import load_file

    from models.nvae.official import official_to_ours

    folder = FIXTURE
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(folder / "official_nvae_checkpoint.pt", weights_only=True)
    args = json.loads((folder / "fixture.json").read_text())["nvae_args"]
    cfg = NVAEConfig(
        image_size=32, channels_enc=args["num_channels_enc"], channels_dec=args["num_channels_dec"],
        num_latent_scales=args["num_latent_scales"], groups_per_scale=args["num_groups_per_scale"],
        num_flows=args["num_nf"],
    )
    model = NVAE(cfg)
    result = model.load_state_dict(official_to_ours(checkpoint["state_dict"], cfg), strict=False)
    assert result.unexpected_keys == []
    assert all(k.startswith("spectral.") or k.endswith("data_init_done") for k in result.missing_keys)
    expected = load_file(str(folder / "official_nvae_expected.safetensors"))
    eps = [expected[f"eps_z_{i}"] for i in range(model.num_groups)]
    model.eval()
    with torch.no_grad():
        gen = model.decode(eps)
        cold = model.decode(eps, temperature=0.7)
    for i, z in enumerate(gen.z):
        torch.testing.assert_close(z, expected[f"z_{i}"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gen.x_mean, expected["decoder_mean"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gen.x_log_sigma.exp(), expected["decoder_sigma"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cold.x_mean, expected["decoder_mean_t0.7"], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Distributions and flows.


def test_analytic_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    q = Normal(torch.tensor([0.3, -1.0]), torch.tensor([-0.5, 0.4]))
    p = Normal(torch.tensor([-0.2, 0.5]), torch.tensor([0.2, -0.3]))
    z = q.mu + q.sigma * torch.randn(400_000, 2, generator=g)
    monte_carlo = (q.log_prob(z) - p.log_prob(z)).mean(dim=0)
    torch.testing.assert_close(monte_carlo, q.kl(p), atol=1e-2, rtol=0)
    assert torch.allclose(Normal.standard(torch.zeros(3)).sigma, torch.full((3,), 1.01))


def test_flow_is_autoregressive_and_volume_preserving():
    torch.manual_seed(0)
    cell = AutoregressiveShift(3, mirror=False)
    with torch.no_grad():  # larger μ weights than the near-identity init, so the test bites
        cell.conv_mu.log_weight_norm.add_(2.0)
    z = torch.randn(1, 3, 3, 3)
    # Flatten in raster order, channel fastest: pixel-major then channel.
    to_raster = lambda t: t.permute(0, 2, 3, 1).reshape(-1)
    from_raster = lambda v: v.reshape(1, 3, 3, 3).permute(0, 3, 1, 2)
    jac = torch.autograd.functional.jacobian(lambda v: to_raster(cell(from_raster(v))), to_raster(z))
    torch.testing.assert_close(torch.triu(jac, diagonal=1), torch.zeros_like(jac))  # depends on the past only
    torch.testing.assert_close(torch.diagonal(jac), torch.ones(27))
    assert torch.tril(jac, diagonal=-1).abs().sum() > 1e-3  # and does depend on it
    paired = PairedFlow(3)
    jac2 = torch.autograd.functional.jacobian(lambda v: to_raster(paired(from_raster(v))), to_raster(z))
    assert abs(torch.linalg.det(jac2).item() - 1.0) < 1e-4


# ----------------------------------------------------------------------------------------------
# The reparameterization ε ↔ (z, x).


def test_noise_to_latents_to_noise_round_trip_and_temperature():
    model = _tiny().eval()
    _randomize_bn(model)
    g = torch.Generator().manual_seed(5)
    eps_z = [torch.randn(2, *s, generator=g) for s in model.latent_shapes]
    eps_x = torch.randn(2, *model.image_shape, generator=g)
    t = 0.6
    with torch.no_grad():
        gen = model.decode(eps_z, eps_x, temperature=t)
        back_z, back_x = model.latents_to_noise(gen.z, gen.x_sample, temperature=t)
        base = model.decode(eps_z, eps_x, temperature=1.0)
    for a, b in zip(back_z, eps_z):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(back_x, eps_x, atol=1e-4, rtol=1e-4)
    # Temperature scales every σ: the top prior N(0, 1.01²) and the decoder σ.
    torch.testing.assert_close(gen.z[0], t * 1.01 * eps_z[0])
    torch.testing.assert_close(gen.x_sample - gen.x_mean, t * gen.x_log_sigma.exp() * eps_x)
    assert not torch.allclose(gen.z[1], base.z[1])


def test_decode_is_differentiable_in_noise():
    model = _tiny().eval().requires_grad_(False)
    eps_z = [torch.randn(2, *s, requires_grad=True) for s in model.latent_shapes]
    eps_x = torch.randn(2, *model.image_shape, requires_grad=True)
    gen = model.decode(eps_z, eps_x, temperature=0.8)
    grads = torch.autograd.grad(gen.x_sample.square().sum(), [*eps_z, eps_x])
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_encode_noise_then_decode_reproduces_x_and_posterior_z():
    model = _tiny().eval()
    _randomize_bn(model)
    x = _images(2, TINY)
    with torch.no_grad():
        for sample in (True, False):
            eps_z, eps_x = model.encode_noise(x, temperature=0.7, sample=sample, generator=torch.Generator().manual_seed(0))
            gen = model.decode(eps_z, eps_x, temperature=0.7)
            torch.testing.assert_close(gen.x_sample, model.quantize(x), atol=1e-4, rtol=1e-4)
            again, _ = model.latents_to_noise(gen.z, temperature=0.7)  # the z's are the posterior ones
            for a, b in zip(again, eps_z):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        first, _ = model.encode_noise(x, generator=torch.Generator().manual_seed(1))
        second, _ = model.encode_noise(x, generator=torch.Generator().manual_seed(1))
        assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("num_flows", [0, 1])
def test_residual_posterior_equals_prior_when_encoder_adds_nothing(num_flows):
    """q = N(prior_raw + Δ): with Δ = 0 (and identity flows), q = p and every KL below the top is 0,
    analytic (no flows) or Monte Carlo (flows); with the plain posterior it is not."""
    for residual in (True, False):
        model = _tiny(num_flows=num_flows, residual_posterior=residual)
        with torch.no_grad():
            for sampler in model.enc_samplers[1:]:
                sampler.weight.zero_()
                sampler.bias.zero_()
            for flow in model.modules():
                if isinstance(flow, AutoregressiveShift):
                    flow.conv_mu.bias.zero_()
                    flow.conv_mu.log_weight_norm.fill_(-30.0)  # μ(z) ≈ 0: identity flow
        out = model(_images(2, TINY))
        below_top = torch.stack(out.kl_per_group[1:])
        if residual:
            torch.testing.assert_close(below_top, torch.zeros_like(below_top), atol=1e-4, rtol=0)
        else:
            assert below_top.abs().max() > 1e-2
        assert out.kl_per_group[0].abs().max() > 1e-2


def test_five_bit_quantization():
    model = _tiny(num_x_bits=5)
    levels = torch.arange(256).float()
    x = (levels / 127.5 - 1.0).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    expected = torch.floor(levels / 8) / 31 * 2 - 1
    torch.testing.assert_close(model.quantize(x)[0, 0].flatten(), expected)
    assert len(model.quantize(x).unique()) == 32
    assert torch.equal(_tiny(num_x_bits=8).quantize(x), x)
    # forward scores the quantized input: an input and its quantization give the same loss.
    model.eval()
    torch.manual_seed(0)
    a = model(x).recon_log_prob
    torch.manual_seed(0)
    b = model(model.quantize(x)).recon_log_prob
    torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------
# Regularizers.


def test_spectral_loss_positive_differentiable_and_persistent():
    model = _tiny()
    loss = model.spectral_loss()
    assert loss.ndim == 0 and loss.item() > 0
    loss.backward()
    assert model.stem.log_weight_norm.grad is not None and model.stem.log_weight_norm.grad.abs().sum() > 0
    state = model.state_dict()
    assert "spectral.u0" in state and "spectral.v0" in state
    clone = _tiny(seed=1)
    clone.load_state_dict(state)
    torch.testing.assert_close(clone.spectral.u0, model.spectral.u0)
    bn = model.bn_loss()
    assert bn.item() > 0 and bn.requires_grad


# ----------------------------------------------------------------------------------------------
# BatchNorm statistics.


def test_readjust_bn_touches_only_the_generative_path_and_cache_round_trips():
    model = _tiny()
    _randomize_bn(model)
    before = model.bn_statistics(generative_only=False)
    generative = set(model.bn_statistics(generative_only=True))
    assert generative and generative < set(before)
    with model.temperature_statistics(0.7, passes=3, batch_size=4, generator=torch.Generator().manual_seed(0)):
        inside = model.bn_statistics(generative_only=False)
        assert not model.training
    after = model.bn_statistics(generative_only=False)
    for key in before:
        assert torch.equal(after[key], before[key])  # restored on exit
        if key in generative:
            assert not torch.equal(inside[key], before[key]), key
        else:
            assert torch.equal(inside[key], before[key]), key  # encoder untouched
    cache = model.bn_cache_state()
    assert cache and all(k.startswith("t0.70/") for k in cache)
    other = _tiny(seed=1)
    other.load_state_dict(model.state_dict())
    other.load_bn_cache_state(cache)
    assert other.cached_temperatures() == [0.7]
    with other.temperature_statistics(0.7, passes=0):  # cached: no re-adjustment needed
        for key, value in other.bn_statistics(generative_only=True).items():
            assert torch.equal(value, inside[key])
    with pytest.raises(KeyError):
        other.load_bn_cache_state({"t0.70/encoder_top.nope.running_mean": torch.zeros(1)})


# ----------------------------------------------------------------------------------------------
# Gradient checkpointing.


def test_gradient_checkpointing_is_equivalent():
    plain = _tiny(num_flows=1).train()
    _randomize_bn(plain)
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing = True
    x = _images(4, TINY)
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(123)
        out = model(x)
        loss = -out.recon_log_prob.mean() + sum(k.mean() for k in out.kl_per_group) + 0.1 * model.spectral_loss()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                        model.bn_statistics(generative_only=False),
                        {n: b.clone() for n, b in model.named_buffers() if n.endswith("num_batches_tracked")}))
    (loss_a, grads_a, stats_a, counts_a), (loss_b, grads_b, stats_b, counts_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4, msg=name)
    for key in stats_a:
        torch.testing.assert_close(stats_a[key], stats_b[key], atol=1e-6, rtol=1e-5, msg=key)
    assert counts_a == counts_b and all(int(v) == 1 for v in counts_b.values())  # updated once, not twice


def test_readjusted_statistics_are_those_of_samples_at_the_temperature():
    """After `readjust_bn(t)`, each generative BN layer's running mean and variance are the statistics of its
    inputs when the model samples at t (VAEBM App. E), measured here on one large batch; at another
    temperature the inputs' statistics differ, so the check tells temperatures apart."""
    model = _tiny()
    _randomize_bn(model)
    layers = dict(model.bn_layers(generative_only=True))

    def input_statistics(temperature: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        seen, hooks = {}, []
        for name, layer in layers.items():
            def record(module, inputs, output, name=name):
                x = inputs[0].transpose(0, 1).flatten(1)
                seen[name] = (x.mean(1), x.var(1))
            hooks.append(layer.register_forward_hook(record))
        model.eval()
        for layer in layers.values():
            layer.train()  # normalize with batch statistics, as the readjustment's passes do
        with torch.no_grad():
            model.sample(1024, temperature=temperature, generator=torch.Generator().manual_seed(7))
        for hook in hooks:
            hook.remove()
        model.eval()
        return seen

    saved = model.bn_statistics()
    with model.temperature_statistics(0.5, passes=200, batch_size=16, generator=torch.Generator().manual_seed(0)):
        readjusted = model.bn_statistics()
    model.load_bn_statistics(saved)
    target, other = input_statistics(0.5), input_statistics(1.0)
    model.load_bn_statistics(saved)

    def worst_var_ratio(stats) -> float:
        ratios = [(readjusted[f"{name}.running_var"] / var).log().abs().max() for name, (_, var) in stats.items()]
        return float(torch.stack(ratios).max().exp())

    for name, (mean, var) in target.items():
        assert (readjusted[f"{name}.running_mean"] - mean).abs().max() < 0.15 * var.sqrt().max(), name
    assert worst_var_ratio(target) < 1.3
    assert worst_var_ratio(other) > 1.5
