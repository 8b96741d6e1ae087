"""Energy networks: shapes, parameter counts vs the official nets, data-dependent init, spectral loss."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.energy import EnergyNetConfig, MLPEnergy, build_energy, count_parameters
from models.layers import Conv2d
from models.spectral import collect_convs

# Parameter and conv counts of the official VAEBM energy classes (WN log-gains included); the names and shapes
# themselves are checked against the official state-dict listing in tests/fixtures/.
FACT_PARAMS = {"cifar10": 5.14e6, "celeba64": 4.34e6, "lsun_church64": 5.81e6, "celebahq256": 14.21e6}
FACT_CONVS = {"cifar10": 16, "celeba64": 22, "lsun_church64": 26, "celebahq256": 31}
OFFICIAL = Path(__file__).parent / "fixtures" / "official-state-dicts.json"


@pytest.mark.parametrize("layout", sorted(FACT_PARAMS))
def test_paper_presets_match_facts(layout):
    net = build_energy(EnergyNetConfig(layout=layout))
    n = count_parameters(net)
    assert abs(n - FACT_PARAMS[layout]) / FACT_PARAMS[layout] < 0.10, n
    assert len([m for m in net.modules() if isinstance(m, Conv2d)]) == FACT_CONVS[layout]
    assert net.spectral.num_layers == FACT_CONVS[layout]  # every conv, the final Linear excluded


@pytest.mark.parametrize("layout", sorted(FACT_PARAMS))
def test_parameter_names_and_shapes_match_official(layout):
    official = json.loads(OFFICIAL.read_text())["ebm"][layout]
    net = build_energy(EnergyNetConfig(layout=layout))
    ours = [(name, list(p.shape)) for name, p in net.named_parameters()]
    assert ours == [(name, shape) for name, shape, _ in official["state_dict"]]
    assert count_parameters(net) == official["num_params"]


@pytest.mark.parametrize(
    "layout,size,channels",
    [("cifar10", 32, 3), ("digits", 32, 1), ("digits16", 16, 1), ("celeba64", 64, 3), ("celebahq256", 64, 3)],
)
def test_conv_energy_output_shape(layout, size, channels):
    # celebahq256 runs at 64×64 here (sum pooling makes the net size-agnostic) to keep the test cheap.
    torch.manual_seed(0)
    net = build_energy(EnergyNetConfig(layout=layout, image_size=size, in_channels=channels))
    x = torch.rand(3, channels, size, size) * 2 - 1
    net.initialize_from_data(x)
    e = net(x)
    assert e.shape == (3,) and e.dtype == torch.float32 and torch.isfinite(e).all()


def test_image_size_must_fit_layout():
    with pytest.raises(ValueError):
        build_energy(EnergyNetConfig(layout="cifar10", image_size=20))  # 3 downsamples need a multiple of 8
    with pytest.raises(ValueError):
        build_energy(EnergyNetConfig(layout="nope"))


def test_energy_is_per_sample():
    # No batch coupling (no BN): a sample's energy does not depend on the rest of the batch.
    torch.manual_seed(0)
    net = build_energy(EnergyNetConfig(layout="digits", in_channels=1))
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    net.initialize_from_data(x)
    net.eval()
    torch.testing.assert_close(net(x)[1:2], net(x[1:2]), rtol=1e-5, atol=1e-5)


def test_data_init_first_conv_statistics():
    torch.manual_seed(0)
    net = build_energy(EnergyNetConfig(layout="digits", in_channels=3))
    x = torch.rand(64, 3, 32, 32) * 1.6 - 0.5  # deliberately off-centre input
    outputs = []
    hook = net.conv1.register_forward_hook(lambda m, i, o: outputs.append(o.detach()))
    assert not net.data_init_done
    net.initialize_from_data(x)
    hook.remove()
    assert net.data_init_done
    mean, std = outputs[0].mean(dim=(0, 2, 3)), outputs[0].std(dim=(0, 2, 3))
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-4, rtol=0)
    torch.testing.assert_close(std, torch.full_like(std, 0.2), atol=1e-4, rtol=0)
    # Deeper convs were initialized too, each on the output of the already-initialized layers before it.
    assert bool(net.blocks[-1].conv2.data_init_done)


def test_without_data_init_statistics_differ():
    # The statistics test above can fail: PyTorch's default init does not give mean 0 / std 0.2.
    torch.manual_seed(0)
    net = build_energy(EnergyNetConfig(layout="digits", data_init=False))
    x = torch.rand(64, 3, 32, 32) * 1.6 - 0.5
    out = net.conv1(x)
    assert (out.std(dim=(0, 2, 3)) - 0.2).abs().max() > 0.02


def test_data_init_done_persists_through_state_dict():
    torch.manual_seed(0)
    cfg = EnergyNetConfig(layout="digits")
    trained = build_energy(cfg)
    trained.initialize_from_data(torch.rand(16, 3, 32, 32) * 2 - 1)
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    assert any(k.endswith("data_init_done") for k in state)

    torch.manual_seed(1)
    loaded = build_energy(cfg)
    assert not loaded.data_init_done
    loaded.load_state_dict(state)
    assert loaded.data_init_done
    loaded.train()
    loaded(torch.randn(8, 3, 32, 32) * 3)  # a train-mode forward on other data must not re-initialize
    for k, v in loaded.state_dict().items():
        if not k.startswith("spectral."):
            assert torch.equal(v, state[k]), k


def test_spectral_loss_differentiable_and_persistent():
    torch.manual_seed(0)
    net = build_energy(EnergyNetConfig(layout="digits16", in_channels=1))
    keys = net.state_dict().keys()
    assert any(k.startswith("spectral.u") for k in keys) and any(k.startswith("spectral.v") for k in keys)
    for _ in range(3):
        loss = net.spectral_loss()  # 40 power iterations first, then 4 warm-started ones
    exact = sum(torch.linalg.matrix_norm(c.effective_weight().flatten(1), ord=2) for c in collect_convs(net))
    torch.testing.assert_close(loss.detach(), exact.detach(), rtol=1e-3, atol=0)
    loss.backward()
    for conv in [net.conv1, net.blocks[0].conv1, net.blocks[0].skip[0]]:
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
        assert conv.log_weight_norm.grad is not None
    assert net.linear.weight.grad is None  # the final Linear is not regularized
    # u/v vectors are restored with the state dict.
    other = build_energy(EnergyNetConfig(layout="digits16", in_channels=1))
    other.load_state_dict(net.state_dict())
    torch.testing.assert_close(other.spectral.u0, net.spectral.u0, rtol=0, atol=0)
    assert bool(other.spectral.warm)


def test_mlp_energy():
    torch.manual_seed(0)
    net = build_energy(EnergyNetConfig(kind="mlp", input_dim=2, hidden=32, depth=3))
    assert isinstance(net, MLPEnergy)
    assert net(torch.randn(5, 2)).shape == (5,)
    assert len([m for m in net.modules() if isinstance(m, torch.nn.Linear)]) == 4
    latent = build_energy(EnergyNetConfig(kind="mlp", input_dim=4 * 3 * 3, hidden=16, depth=1))
    assert latent(torch.randn(6, 4, 3, 3)).shape == (6,)  # latent maps are flattened
    latent.initialize_from_data(torch.randn(6, 4, 3, 3))  # no-op, must not fail
    # The spectral term is the sum of the linear weights' largest singular values (power iteration).
    exact = sum(torch.linalg.matrix_norm(m.weight.detach(), ord=2) for m in latent.modules()
                if isinstance(m, torch.nn.Linear))
    assert latent.spectral_loss().item() == pytest.approx(float(exact), rel=1e-3)
    latent.spectral_loss().backward()
    assert all(m.weight.grad is not None for m in latent.modules() if isinstance(m, torch.nn.Linear))
    with pytest.raises(ValueError):
        build_energy(EnergyNetConfig(kind="transformer"))


def test_mlp_input_scale_is_the_same_network_on_scaled_inputs():
    """energy.input_scale = s: E_s(x) = E_1(s·x) with the same weights, and its input gradient s·∇E_1(s·x)."""
    torch.manual_seed(0)
    scaled = build_energy(EnergyNetConfig(kind="mlp", input_dim=2, hidden=16, depth=2, input_scale=4.0))
    plain = build_energy(EnergyNetConfig(kind="mlp", input_dim=2, hidden=16, depth=2))
    plain.load_state_dict(scaled.state_dict())
    x = torch.randn(7, 2, requires_grad=True)
    energy = scaled(x)
    torch.testing.assert_close(energy, plain(4.0 * x.detach()))
    assert not torch.allclose(energy, plain(x.detach()))  # the scale is applied, not ignored
    (grad,) = torch.autograd.grad(energy.sum(), x)
    x_scaled = (4.0 * x.detach()).requires_grad_(True)
    (grad_plain,) = torch.autograd.grad(plain(x_scaled).sum(), x_scaled)
    torch.testing.assert_close(grad, 4.0 * grad_plain)
    with pytest.raises(ValueError, match="input_scale"):
        MLPEnergy(2, input_scale=0.0)


def test_gradient_checkpointing_same_energies_and_gradients_in_training_and_langevin():
    from models.langevin import PerChainNoise, langevin

    torch.manual_seed(0)
    plain = build_energy(EnergyNetConfig(layout="digits16", in_channels=3))
    plain.initialize_from_data(torch.randn(8, 3, 16, 16))
    recomputing = build_energy(EnergyNetConfig(layout="digits16", in_channels=3, gradient_checkpointing=True))
    recomputing.load_state_dict(plain.state_dict())
    calls = {"plain": 0, "recomputing": 0}

    def counted(name, forward):  # (forward hooks are not run during a recompute, so wrap forward)
        def run(h):
            calls[name] += 1
            return forward(h)
        return run

    plain.blocks[0].forward = counted("plain", plain.blocks[0].forward)
    recomputing.blocks[0].forward = counted("recomputing", recomputing.blocks[0].forward)

    x = torch.randn(4, 3, 16, 16)  # a training step: gradients to the parameters
    energies = [net(x) for net in (plain, recomputing)]
    for e in energies:
        e.sum().backward()
    torch.testing.assert_close(energies[1], energies[0], rtol=0, atol=0)
    for p, q in zip(plain.parameters(), recomputing.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7)
    assert calls == {"plain": 1, "recomputing": 2}  # the block really ran again in backward

    # Langevin: frozen network, gradients flow to the noise only.
    for net in (plain, recomputing):
        net.requires_grad_(False)
    noise = [torch.randn(4, 3, 16, 16)]
    chains = [langevin(noise, lambda eps, net=net: net(eps[0]), 3, 1e-2, PerChainNoise.for_indices(0, 0, 4))
              for net in (plain, recomputing)]
    torch.testing.assert_close(chains[1].noise[0], chains[0].noise[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chains[1].energy, chains[0].energy, rtol=1e-6, atol=1e-6)
    assert calls == {"plain": 1 + 3, "recomputing": 2 + 2 * 3}
    assert all(p.grad is None or not p.requires_grad for p in recomputing.parameters())
