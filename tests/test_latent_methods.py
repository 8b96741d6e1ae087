"""Latent tilting and the joint latent EBM prior: adapters of the one Langevin sampler and the one EBM loop."""
import json
import math

import pytest
import torch
from conftest import run_script
from safetensors.torch import load_file

from models.adapters import (
    JointPriorEnergy,
    LatentTiltEnergy,
    VAEBMEnergy,
    build_adapter,
)
from models.energy import EnergyNetConfig, MLPEnergy, build_energy
from models.langevin import BatchNoise, langevin
from models.latent_energy import LatentEnergy
from models.mlp_vae import MLPVAE, MLPVAEConfig
from trainer.ebm.objective import ebm_loss
from trainer.run.checkpoint import latest_checkpoint


def small_vae() -> MLPVAE:
    torch.manual_seed(0)
    return MLPVAE(MLPVAEConfig(data_dim=2, latent_dim=4, hidden=16, depth=2)).eval().requires_grad_(False)


def test_latent_energy_keeps_the_spatial_layout_of_latent_maps():
    """Maps are reduced by strided convs to 4x4 and flattened (no pooling): moving a unit inside a map changes the
    energy even where a pooled feature would not see it (the same values, spatially permuted)."""
    shapes = [(3, 4, 4), (3, 8, 8), (5,)]
    torch.manual_seed(0)
    energy = LatentEnergy(shapes, hidden=8, depth=1)
    for features, (channels, side, _) in zip(energy.features[:2], shapes[:2]):
        convs = [m for m in features if isinstance(m, torch.nn.Conv2d)]
        assert [c.stride[0] for c in convs] == ([1] if side == 4 else [2])  # 8x8 → 4x4 in one strided conv
        assert not any(isinstance(m, (torch.nn.AdaptiveAvgPool2d, torch.nn.AvgPool2d)) for m in features)
        assert [m for m in features if isinstance(m, torch.nn.Linear)][0].in_features == 8 * 4 * 4
    z = [torch.randn(6, *shape, generator=torch.Generator().manual_seed(i)) for i, shape in enumerate(shapes)]
    energies = energy(z)
    assert energies.shape == (6,)
    flipped = [z[0], z[1].flip(-1), z[2]]  # the 8x8 map mirrored: the same values at other positions
    assert (energy(flipped) - energies).abs().min() > 1e-4
    leaves = [t.clone().requires_grad_(True) for t in z]
    assert all(g.abs().sum() > 0 for g in torch.autograd.grad(energy(leaves).sum(), leaves))


def test_layerwise_terms_are_separable_and_the_joint_term_couples_the_groups():
    """Without the joint term E(z) = Σ_l E_l(z_l): swapping one group between two samples leaves the total of their
    energies unchanged. The joint term couples the groups, so the same swap changes it."""
    shapes = [(4,), (3, 4, 4)]
    a = [torch.randn(5, *s, generator=torch.Generator().manual_seed(1 + i)) for i, s in enumerate(shapes)]
    b = [torch.randn(5, *s, generator=torch.Generator().manual_seed(7 + i)) for i, s in enumerate(shapes)]
    mixed = lambda first, second: [first[0], second[1]]
    torch.manual_seed(0)
    layerwise = LatentEnergy(shapes, hidden=8, depth=1, joint=False)
    assert layerwise.joint_head is None
    torch.testing.assert_close(layerwise(a) + layerwise(b), layerwise(mixed(a, b)) + layerwise(mixed(b, a)))
    torch.manual_seed(0)
    joint = LatentEnergy(shapes, hidden=8, depth=1, layerwise=False)
    difference = joint(a) + joint(b) - joint(mixed(a, b)) - joint(mixed(b, a))
    assert difference.abs().min() > 1e-5
    with pytest.raises(ValueError):
        LatentEnergy(shapes, layerwise=False, joint=False)


def test_build_energy_latent_needs_shapes():
    cfg = EnergyNetConfig(kind="latent", hidden=8, depth=1)
    with pytest.raises(ValueError, match="latent_shapes"):
        build_energy(cfg)
    assert isinstance(build_energy(cfg, [(4,)]), LatentEnergy)


def test_adapters_move_the_right_noise_and_score_the_right_part():
    vae = small_vae()
    data_energy = MLPEnergy(2, hidden=8, depth=1)
    generator = torch.Generator().manual_seed(3)

    vaebm = build_adapter("vaebm", vae, data_energy)
    tilt = build_adapter("latent-tilting", vae, data_energy)
    assert isinstance(vaebm, VAEBMEnergy) and isinstance(tilt, LatentTiltEnergy)
    assert vaebm.chain_shapes == [(4,), (2,)] and tilt.chain_shapes == [(4,)]

    eps_z = [torch.randn(6, 4, generator=generator)]
    eps_x = torch.randn(6, 2, generator=generator)
    generation = vae.decode(eps_z, eps_x)
    torch.testing.assert_close(vaebm([*eps_z, eps_x]), data_energy(generation.x_sample))
    torch.testing.assert_close(tilt(eps_z), data_energy(generation.x_mean))  # G(z) = decoder mean
    torch.testing.assert_close(tilt.negatives(eps_z), generation.x_mean)

    # Stored ε_z become chains: VAEBM adds fresh ε_x, the latent methods do not.
    assert len(vaebm.chain_noise(eps_z, generator)) == 2 and len(tilt.chain_noise(eps_z, generator)) == 1
    assert len(vaebm.latent_noise([*eps_z, eps_x])) == 1 and len(tilt.latent_noise(eps_z)) == 1


def test_tilting_langevin_moves_eps_z_only_with_the_exact_potential():
    vae = small_vae()
    tilt = LatentTiltEnergy(vae, MLPEnergy(2, hidden=8, depth=1))
    eps = [torch.randn(3, 4, generator=torch.Generator().manual_seed(0))]
    step_size = 1e-2
    generator = torch.Generator().manual_seed(5)
    result = langevin(eps, tilt, 1, step_size, BatchNoise(generator))
    # One step by hand: ε − η/2·∇(E(G(ε)) + ½‖ε‖²) + √η·ω, ω from the same generator.
    leaf = eps[0].clone().requires_grad_(True)
    grad, = torch.autograd.grad((tilt([leaf]) + 0.5 * leaf.pow(2).sum(1)).sum(), leaf)
    omega = torch.randn(3, 4, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(result.noise[0], eps[0] - step_size / 2 * grad + step_size**0.5 * omega)


def test_joint_prior_positives_are_posterior_latents():
    vae = small_vae()
    joint = JointPriorEnergy(vae, LatentEnergy(vae.latent_shapes, hidden=8, depth=1))
    x = torch.randn(7, 2, generator=torch.Generator().manual_seed(1))
    posterior_eps = torch.randn(7, 4, generator=torch.Generator().manual_seed(9))
    z_pos = joint.positives(x, [posterior_eps])
    mu, log_sigma = vae.encode(x)
    torch.testing.assert_close(z_pos[0], mu + log_sigma.exp() * posterior_eps, atol=1e-5, rtol=1e-5)
    eps_z = [torch.randn(7, 4)]
    torch.testing.assert_close(joint.negatives(eps_z)[0], vae.decode(eps_z).z[0])
    assert joint.chain_shapes == [(4,)]


def test_tail_chains_start_a_share_of_the_fresh_chains_in_the_prior_tails():
    """langevin.tail_fraction: the chains of the global batch with index < fraction·total start from N(0, std² I)
    in ε_z; the others, ε_x and held noise (a VampPrior's component selector) keep their draw."""
    from types import SimpleNamespace

    from trainer.config.ebm import LangevinConfig
    from trainer.ebm.negatives import negative_samples, start_in_the_tails
    from trainer.run.collective import BatchRows

    generator = torch.Generator().manual_seed(0)
    noise = [torch.randn(8, 4, generator=generator), torch.randn(8, 1, generator=generator),
             torch.randn(8, 2, generator=generator)]  # ε_z, a held selector ε_k, ε_x
    adapter = SimpleNamespace(held_noise=(1,), latent_noise=lambda n: list(n[:2]))
    rows = BatchRows(4, 8, 8)  # this process holds global chains 4 … 7; chains 0 … 5 start in the tails
    widened = start_in_the_tails(adapter, [n[4:] for n in noise], rows, fraction=0.75, std=3.0)
    torch.testing.assert_close(widened[0], torch.cat([3.0 * noise[0][4:6], noise[0][6:]]), rtol=0, atol=0)
    assert torch.equal(widened[1], noise[1][4:]) and torch.equal(widened[2], noise[2][4:])
    assert start_in_the_tails(adapter, noise, BatchRows(0, 8, 8), fraction=0.0, std=3.0) is noise

    # Through the training iteration's negatives: a nearly frozen chain keeps its wide start.
    tilt = build_adapter("latent-tilting", small_vae(), MLPEnergy(2, hidden=8, depth=1).requires_grad_(False))
    config = LangevinConfig(steps=1, step_size=1e-10, tail_fraction=0.5, tail_std=4.0)
    chains, _ = negative_samples(tilt, None, 4000, 0.0, torch.Generator().manual_seed(1), config)
    norms = chains.noise[0].norm(dim=1)
    assert 3.7 < float(norms[:2000].mean() / norms[2000:].mean()) < 4.3


def test_resampled_starts_bring_fresh_chains_in_the_models_proportions():
    """langevin.start_pool: fresh chains start from prior draws resampled by exp(−E), so an energy that makes one
    half of data space e^6 times likelier gets its share of chain starts there (plain starts: half); replayed
    chains keep their stored ε_z and come first."""
    from trainer.config.ebm import LangevinConfig
    from trainer.ebm.negatives import negative_samples
    from trainer.ebm.replay import ReplayBuffer

    vae = small_vae()
    probe = build_adapter("vaebm", vae, lambda x: x[:, 0])
    split = probe.negatives(probe.initial_noise(8000, torch.Generator().manual_seed(0), "cpu"))[:, 0].median()
    adapter = build_adapter("vaebm", vae, lambda x: -3.0 * torch.tanh(20 * (x[:, 0] - split)))
    right = lambda chains: float((adapter.negatives(chains.noise)[:, 0] > split).float().mean())
    frozen = dict(steps=1, step_size=1e-10)  # chains that keep their starts
    plain, _ = negative_samples(adapter, None, 2000, 0.0, torch.Generator().manual_seed(1), LangevinConfig(**frozen))
    resampled, _ = negative_samples(adapter, None, 2000, 0.0, torch.Generator().manual_seed(1),
                                    LangevinConfig(**frozen, start_pool=16))
    assert 0.45 < right(plain) < 0.55
    assert right(resampled) > 0.97  # h: e^6 / (1 + e^6) = 0.9975 on the right
    # Half the pool carries the weight: an effective pool of about 8 of the 16 draws per chain.
    assert plain.start_ess is None and 7.0 < resampled.start_ess < 9.0

    buffer = ReplayBuffer([(4,)], capacity=4000)
    stored = torch.full((4000, 4), 7.0)
    buffer.push([stored])
    chains, _ = negative_samples(adapter, buffer, 2000, 0.5, torch.Generator().manual_seed(2),
                                 LangevinConfig(**frozen, start_pool=16))
    replayed = int(torch.isclose(chains.noise[0], stored[:2000], atol=1e-3).all(dim=1).sum())
    assert 900 < replayed < 1100 and torch.isclose(chains.noise[0][:replayed], stored[:replayed], atol=1e-3).all()
    fresh = [n[replayed:] for n in chains.noise]
    assert float((adapter.negatives(fresh)[:, 0] > split).float().mean()) > 0.97

    # With tail chains: the first tail_fraction of the chains start wide and unweighted, the rest resampled.
    tails, _ = negative_samples(adapter, None, 2000, 0.0, torch.Generator().manual_seed(3),
                                LangevinConfig(**frozen, start_pool=16, tail_fraction=0.25, tail_std=3.0))
    wide, rest = tails.noise[0][:500], [n[500:] for n in tails.noise]
    assert 2.7 < float(wide.norm(dim=1).mean() / plain.noise[0].norm(dim=1).mean()) < 3.3
    assert float((adapter.negatives(rest)[:, 0] > split).float().mean()) > 0.97


def test_start_pool_is_validated():
    from trainer.config.ebm import VAEBMTrainingConfig
    from trainer.config.loader import load_config
    from trainer.errors import UserError

    cfg = lambda *o: load_config(VAEBMTrainingConfig, "vaebm", "toy2d", ["vae.path=/x", *o])
    assert cfg("langevin.start_pool=8").langevin.start_pool == 8
    assert cfg("langevin.negatives=resample").langevin.start_pool == 16  # exact negatives start no chains
    with pytest.raises(UserError, match="start_pool"):
        cfg("langevin.start_pool=0")


def test_tail_chains_need_fresh_langevin_chains(tmp_path, toy_vae):
    result = run_script("train_vaebm.py", "--config", "latent-tilting-toy2d", "--vae", str(toy_vae), "--run-dir",
                        str(tmp_path / "r"), "langevin.tail_fraction=0.25", "replay.enabled=true", check=False)
    assert result.returncode == 2 and "tail_fraction" in result.stderr and "Traceback" not in result.stderr


def test_energy_regularization_term():
    pos, neg = torch.tensor([1.0, 3.0]), torch.tensor([-2.0, 0.0])
    plain, _ = ebm_loss(pos, neg, torch.tensor(0.0), 0.0)
    regularized, terms = ebm_loss(pos, neg, torch.tensor(0.0), 0.0, energy_reg_coeff=0.1)
    assert float(plain) == pytest.approx(2.0 - (-1.0))
    assert terms["energy_sq"] == pytest.approx(5.0 + 2.0)
    assert float(regularized) == pytest.approx(3.0 + 0.1 * 7.0)


TOY_FAST = ["train.per_device_batch_size=64", "train.global_batch_size=64", "train.progress_bar=false",
            "train.log_every=2"]


@pytest.fixture(scope="module")
def toy_vae(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("toy-vae") / "vae"
    run_script("train_nvae.py", "--config", "toy2d", "--run-dir", str(run_dir), "train.max_steps=20", *TOY_FAST)
    return run_dir


@pytest.mark.parametrize("preset, extra", [
    ("latent-tilting-toy2d", ["langevin.steps=4", "langevin.sample_steps=4"]),
    ("vaebm", ["method=joint-prior", "energy.kind=latent", "energy.hidden=16", "energy.depth=1",
               "langevin.steps=4", "langevin.step_size=0.05", "langevin.sample_steps=4", "optim.slope_coeff=0.01"]),
])
@pytest.mark.slow
def test_latent_method_trains_resumes_exactly_exports_and_samples(tmp_path, toy_vae, preset, extra):
    preset = "toy2d" if preset == "vaebm" else preset
    straight, paused = tmp_path / "straight", tmp_path / "paused"

    def args(run_dir):
        return ["--config", preset, "--vae", str(toy_vae), "--run-dir", str(run_dir), *TOY_FAST, *extra, "train.max_steps=4"]

    run_script("train_vaebm.py", *args(straight))
    run_script("train_vaebm.py", *args(paused), "train.halt_at_step=2")
    resumed = run_script("train_vaebm.py", *args(paused))
    assert "resuming from step 2" in resumed.stderr
    weights = [load_file(str(latest_checkpoint(run) / "energy.safetensors")) for run in (straight, paused)]
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=0, atol=0, msg=name)
    row = json.loads((straight / "stats.jsonl").read_text().splitlines()[-1])
    # Logged and finite; that the methods learn (the sign of their gap) is tests/test_latent_method_toys.py's job.
    assert row["step"] == 4 and "energy_sq" in row and math.isfinite(row["energy_gap"])
    # The slope penalty runs here on the joint prior's per-group latent inputs (a list of tensors); both presets
    # run Metropolis-adjusted chains (the joint prior on its latent inputs), exact resume included.
    assert ("slope_sq" in row) == (preset == "toy2d") and math.isfinite(row.get("slope_sq", 0.0))
    assert 0 <= row["langevin_acceptance"] <= 1

    bundle, samples = tmp_path / "bundle", tmp_path / "samples"
    run_script("export.py", str(straight), "--out", str(bundle))
    manifest = json.loads((bundle / "bundle.json").read_text())
    method = "joint-prior" if "method=joint-prior" in extra else "latent-tilting"
    assert manifest["energy"]["method"] == method
    run_script("sample.py", str(bundle), "--n", "8", "--out", str(samples), "--steps", "3")
    assert list(samples.glob("points-*.npz"))


def test_method_and_energy_kind_must_fit(tmp_path, toy_vae):
    result = run_script("train_vaebm.py", "--config", "toy2d", "--vae", str(toy_vae), "--run-dir", str(tmp_path / "r"),
                        "method=joint-prior", check=False)
    assert result.returncode == 2
    assert "energy.kind" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()


def test_finetune_surrogate_and_nvae_prior_log_prob():
    from trainer.ebm.finetune import finetune_loss

    loss, terms = finetune_loss(torch.tensor([1.0, 3.0]), torch.tensor([0.5, 0.5]), torch.tensor([-1.0, 1.0]),
                                torch.tensor([-4.0, -6.0]))
    assert float(loss) == pytest.approx((1.5 + 3.5 + 0.0) / 2 - 5.0)
    assert terms["finetune/log_prior_negatives"] == pytest.approx(-5.0)


def test_nvae_prior_log_prob_is_the_change_of_variables(tmp_path):
    from models.registry import build_vae
    from trainer.config.loader import load_config
    from trainer.config.nvae import NVAETrainingConfig, architecture_dict

    cfg = load_config(NVAETrainingConfig, "nvae", "digits", [], expand={"model": architecture_dict}).model
    torch.manual_seed(0)
    vae = build_vae(cfg).eval()
    eps = [torch.randn(2, *shape) for shape in vae.latent_shapes]
    z = [t.detach() for t in vae.decode(eps).z]
    # log p(z) = Σ_l [log N(ε_l; 0, 1) − Σ log σ_l(z_<l)]. z_l is linear in ε_l with slope σ_l (groups above
    # unchanged), so σ_l = z_l(ε_l + 1) − z_l(ε_l), shifting one group at a time.
    expected = torch.zeros(2)
    for g in range(len(eps)):
        shifted = [e.clone() for e in eps]
        shifted[g] = shifted[g] + 1.0
        sigma = (vae.decode(shifted).z[g] - z[g]).detach()
        expected += (-0.5 * eps[g] ** 2 - 0.5 * torch.log(torch.tensor(2 * torch.pi)) - sigma.log()).sum(dim=(1, 2, 3))
    torch.testing.assert_close(vae.prior_log_prob(z).detach(), expected, rtol=1e-4, atol=1e-3)


def test_finetune_on_an_nvae_with_batchnorm_moves_bn_statistics_only_by_the_data():
    """Generator fine-tuning on an NVAE: the data's forward pass trains (batch statistics, running statistics
    updated), the negatives' log-prior is the eval-mode prior Langevin sampled from (it must not update the BN
    statistics), and the step changes the weights."""
    from types import SimpleNamespace

    from models.latent_energy import LatentEnergy
    from models.registry import build_vae
    from trainer.config.loader import load_config
    from trainer.config.nvae import NVAETrainingConfig, architecture_dict
    from trainer.ebm.finetune import GeneratorFinetuner

    cfg = load_config(NVAETrainingConfig, "nvae", "digits16", [], expand={"model": architecture_dict}).model
    torch.manual_seed(0)
    vae = build_vae(cfg).eval()
    twin = build_vae(cfg).eval()
    twin.load_state_dict(vae.state_dict())
    x = torch.rand(4, *vae.image_shape) * 2 - 1
    with torch.no_grad():
        negatives = [z.detach() for z in vae.decode([torch.randn(4, *s) for s in vae.latent_shapes]).z]
    energy = LatentEnergy([tuple(z.shape[1:]) for z in negatives], hidden=16)
    accelerator = SimpleNamespace(num_processes=1)
    finetuner = GeneratorFinetuner(vae, lr=1e-3, accelerator=accelerator)
    torch.manual_seed(1)
    terms = finetuner.step(x, negatives, energy)
    twin.train()
    torch.manual_seed(1)
    with torch.no_grad():
        twin(x)  # the data's forward pass alone, with the same posterior noise
    twin.eval()
    buffers, twin_buffers = dict(vae.named_buffers()), dict(twin.named_buffers())
    bn = [name for name in buffers if name.endswith(("running_mean", "running_var"))]
    assert bn and all(torch.equal(buffers[name], twin_buffers[name]) for name in bn)
    assert not vae.training and terms["finetune/skipped"] == 0.0
    weights, twin_weights = dict(vae.named_parameters()), dict(twin.named_parameters())
    assert any(not torch.equal(weights[name], twin_weights[name]) for name in weights)


@pytest.mark.slow
def test_joint_finetune_trains_the_vae_resumes_exactly_and_exports_it(tmp_path, toy_vae):
    straight, paused = tmp_path / "straight", tmp_path / "paused"

    def args(run_dir):
        return ["--config", "toy2d", "--vae", str(toy_vae), "--run-dir", str(run_dir), *TOY_FAST, "method=joint-prior",
                "energy.kind=latent", "energy.hidden=16", "energy.depth=1", "langevin.steps=3",
                "langevin.step_size=0.05", "vae.finetune=true", "vae.finetune_lr=1e-3", "train.max_steps=4"]

    run_script("train_vaebm.py", *args(straight))
    run_script("train_vaebm.py", *args(paused), "train.halt_at_step=2")
    run_script("train_vaebm.py", *args(paused))
    finetuned = [load_file(str(latest_checkpoint(run) / "vae.safetensors")) for run in (straight, paused)]
    original = load_file(str(latest_checkpoint(toy_vae) / "ema.safetensors"))
    assert any(not torch.equal(finetuned[0][k], original[k]) for k in original)  # the VAE was trained
    for name in finetuned[0]:
        torch.testing.assert_close(finetuned[0][name], finetuned[1][name], rtol=0, atol=0, msg=name)
    exported = run_script("export.py", str(straight), "--out", str(tmp_path / "bundle"))
    assert "fine-tuned" in exported.stderr
    bundle_vae = load_file(str(tmp_path / "bundle" / "vae.safetensors"))
    torch.testing.assert_close(bundle_vae["decoder.0.weight"], finetuned[0]["decoder.0.weight"])


def test_finetune_is_refused_for_other_methods(tmp_path, toy_vae):
    result = run_script("train_vaebm.py", "--config", "latent-tilting-toy2d", "--vae", str(toy_vae), "--run-dir",
                        str(tmp_path / "r"), "vae.finetune=true", check=False)
    assert result.returncode == 2 and "vae.finetune" in result.stderr
