"""Latent tilting and the joint latent EBM prior as methods, on problems small enough to know the answer (as
tests/test_vaebm_method.py does for VAEBM): the loop's own training iteration (`EnergyUpdate.step`) with the
project's Langevin sampler must move the model toward the data by a clear margin, measured exactly on a grid;
an energy trained with the wrong sign must make it worse.

The "VAE" is fixed and linear-Gaussian, with a 2-D latent: z ~ N(0, I), decoder mean G(z) = SCALE·z, decoder
noise NOISE, posterior q(z|x) = N(x/SCALE, POSTERIOR_STD²). The data are four Gaussian modes. Then
- the latent tilt p(z) ∝ N(z; 0, I)·exp(−E(G(z))) has, in the decoder means y = G(z), the density
  ∝ N(y; 0, SCALE²)·exp(−E(y)), and its data density is that convolved with N(0, NOISE²): both exact on a grid;
- the joint prior p(z) ∝ N(z; 0, I)·exp(−E(z)) is exact on a grid in z, and its target is the aggregate
  posterior of the data (the modes, widened by POSTERIOR_STD).
"""
import math

import pytest
import torch
import torch.nn as nn
from test_vaebm_method import _Negated

from models.adapters import build_adapter
from models.energy import EnergyNetConfig, build_energy
from models.langevin import seeded_chains
from models.latent_energy import LatentEnergy
from models.nvae.model import Generation
from trainer.config.common import TrainConfig
from trainer.config.ebm import VAEBMTrainingConfig
from trainer.config.loader import load_config
from trainer.ebm.loop import EnergyUpdate
from trainer.evaluation.toy_metrics import square_grid
from trainer.run.collective import BatchRows
from trainer.run.launch import make_accelerator

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODES = torch.tensor([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]])
MODE_STD = 0.25
BATCH = 256


class LinearGaussianVAE(nn.Module):
    """A fixed 'VAE': z = t·ε_z ~ N(0, t²I) in 2-D, G(z) = scale·z, x = G(z) + t·noise·ε_x, and the posterior
    q(z|x) = N(x / scale, posterior_std²)."""

    latent_shapes = [(2,)]
    z_shapes = [(2,)]
    image_shape = (2,)

    def __init__(self, scale: float, noise: float, posterior_std: float):
        super().__init__()
        self.scale, self.noise, self.posterior_std = scale, noise, posterior_std

    def decode(self, eps_z, eps_x=None, temperature: float = 1.0) -> Generation:
        z = temperature * eps_z[0]
        mean = self.scale * z
        sample = None if eps_x is None else mean + temperature * self.noise * eps_x
        return Generation(z=[z], x_mean=mean, x_log_sigma=torch.full_like(mean, math.log(self.noise)), x_sample=sample)

    def posterior_noise(self, x, posterior_eps, temperature: float = 1.0):
        """(ε_z of a posterior draw, no ε_x, a dummy weight): what the joint prior's positives need."""
        z = x / self.scale + self.posterior_std * posterior_eps[0]
        return [z / temperature], None, torch.zeros(x.shape[0])


def data_batches(seed: int):
    generator = torch.Generator().manual_seed(seed)
    while True:
        component = torch.randint(0, len(MODES), (BATCH,), generator=generator)
        yield {"x": MODES[component] + MODE_STD * torch.randn(BATCH, 2, generator=generator)}


def mixture_log_prob(points: torch.Tensor, std: float) -> torch.Tensor:
    components = torch.distributions.Normal(MODES.double(), std).log_prob(points.double()[:, None]).sum(-1)
    return torch.logsumexp(components, 1) - math.log(len(MODES))


def near_modes(points: torch.Tensor) -> torch.Tensor:
    """1.0 for points within 3 mode std of a mode, else 0.0: [N] float64."""
    return (torch.cdist(points.double(), MODES.double()).min(1).values < 3 * MODE_STD).double()


def train(method: str, vae, energy: nn.Module, overrides: list[str], steps: int, sign: float = 1.0) -> nn.Module:
    """`energy` trained on `vae` by the real training iteration with the method's preset (20 Langevin steps at 0.05
    here, to be quick); `sign` −1 flips the loss (the module reports −E while it trains)."""
    preset = "latent-tilting-toy2d" if method == "latent-tilting" else "joint-prior-hvae-digits"
    cfg = load_config(VAEBMTrainingConfig, "vaebm", preset, [
        "vae.path=unused", "train.seed=0", "langevin.steps=20", "langevin.step_size=0.05", *overrides])
    if sign < 0:
        energy = _Negated(energy)
    launch = make_accelerator(TrainConfig(global_batch_size=BATCH, per_device_batch_size=BATCH, mixed_precision="no"))
    optimizer = torch.optim.Adam(energy.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2))
    energy, optimizer = launch.accelerator.prepare(energy, optimizer)
    update = EnergyUpdate(energy, energy, optimizer, build_adapter(method, vae, energy), None, None, launch, cfg,
                          rows=BatchRows(0, BATCH, BATCH), noise_rank=0)
    batches = data_batches(seed=1)
    for step in range(steps):
        update.step(step, batches)
    net = energy.inner if sign < 0 else energy
    return net.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Latent tilting.

TILT_VAE = dict(scale=1.5, noise=0.1, posterior_std=0.1)


def tilt_training(sign: float = 1.0, steps: int = 150) -> nn.Module:
    torch.manual_seed(0)
    energy = build_energy(EnergyNetConfig(kind="mlp", input_dim=2, hidden=64, depth=3))
    # The paper's optimizer, pinned (Adam's default betas, no clip, no weight decay: the preset's).
    paper_optimizer = ["optim.beta1=0.9", "optim.clip_std=0", "optim.weight_decay=0"]
    return train("latent-tilting", LinearGaussianVAE(**TILT_VAE), energy, paper_optimizer, steps, sign)


def exact_tilt(energy) -> dict:
    """The trained tilt, exactly: test log-likelihoods (nats per point) of the VAE, the tilt and the truth, and the
    share of the tilt's decoder means near a mode (the VAE's, for comparison)."""
    scale, noise = TILT_VAE["scale"], TILT_VAE["noise"]
    grid, area = square_grid(3.5 * scale, 0.05)  # decoder means y; cells of half the decoder noise
    grid = grid.double()
    with torch.no_grad():
        log_base = torch.distributions.Normal(0.0, scale).log_prob(grid).sum(1)
        log_tilt = log_base - energy(grid.float()).double()  # unnormalized density of y under the tilt
    test = next(data_batches(seed=7))["x"].double()
    log_px_y = torch.distributions.Normal(grid[None], noise).log_prob(test[:, None]).sum(-1)  # [N, G]
    tilt_ll = torch.logsumexp(log_tilt + log_px_y, 1) - torch.logsumexp(log_tilt, 0)
    vae_ll = torch.distributions.Normal(0.0, math.hypot(scale, noise)).log_prob(test).sum(1)
    near = near_modes(grid)
    return {"vae": float(vae_ll.mean()), "tilt": float(tilt_ll.mean()),
            "true": float(mixture_log_prob(test, MODE_STD).mean()),
            "tilt_near": float((torch.softmax(log_tilt, 0) * near).sum()),
            "vae_near": float((torch.softmax(log_base, 0) * near).sum()),
            "log_z": float(torch.logsumexp(log_tilt, 0)) + math.log(area)}


def test_latent_tilting_moves_decoder_means_to_the_modes_its_exact_tilt_puts_them():
    energy = tilt_training()
    exact = exact_tilt(energy)
    assert exact["tilt"] - exact["vae"] > 0.5 * (exact["true"] - exact["vae"]), exact  # about 1.7 nats to close
    assert exact["tilt_near"] > exact["vae_near"] + 0.3, exact
    # Langevin in ε_z (50 steps from N(0, I), as the bundle samples) reaches what the energy defines.
    adapter = build_adapter("latent-tilting", LinearGaussianVAE(**TILT_VAE), energy)
    initial, final = seeded_chains(adapter, 0, 500, seed=3, steps=50, step_size=0.05)
    with torch.no_grad():
        base, tilted = (float(near_modes(adapter.images(noise)).mean()) for noise in (initial, final))
    assert tilted > base + 0.3 and abs(tilted - exact["tilt_near"]) < 0.15, (base, tilted, exact)


def test_latent_tilting_trained_with_the_wrong_sign_makes_the_vae_worse():
    exact = exact_tilt(tilt_training(sign=-1.0, steps=60))
    assert exact["tilt"] < exact["vae"] - 0.2 and exact["tilt_near"] < exact["vae_near"], exact


# ----------------------------------------------------------------------------------------------
# The joint latent prior.

JOINT_VAE = dict(scale=1.0, noise=0.1, posterior_std=0.05)


def joint_training(sign: float = 1.0, steps: int = 150) -> nn.Module:
    torch.manual_seed(0)
    return train("joint-prior", LinearGaussianVAE(**JOINT_VAE), LatentEnergy([(2,)], hidden=64, depth=2),
                 ["optim.lr=3e-3"], steps, sign)


def exact_joint_prior(energy) -> dict:
    """Log-likelihoods (nats per point) of held-out posterior latents under N(0, I), under the trained joint prior
    (normalized on a grid) and under the aggregate posterior they come from."""
    std = JOINT_VAE["posterior_std"]
    test = next(data_batches(seed=7))["x"].double()
    z = test + std * torch.randn(test.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    grid, area = square_grid(4.0, 0.02)
    standard = lambda points: torch.distributions.Normal(0.0, 1.0).log_prob(points.double()).sum(1)
    with torch.no_grad():
        log_z = float(torch.logsumexp(standard(grid) - energy([grid]).double(), 0)) + math.log(area)
        joint = standard(z) - energy([z.float()]).double() - log_z
    return {"prior": float(standard(z).mean()), "joint": float(joint.mean()),
            "true": float(mixture_log_prob(z, math.hypot(MODE_STD, std)).mean())}


def test_joint_prior_tilts_the_prior_toward_the_aggregate_posterior():
    result = exact_joint_prior(joint_training())
    assert result["joint"] - result["prior"] > 0.5 * (result["true"] - result["prior"]), result  # about 1.4 nats


def test_joint_prior_trained_with_the_wrong_sign_moves_away_from_the_posterior():
    result = exact_joint_prior(joint_training(sign=-1.0, steps=60))
    assert result["joint"] < result["prior"] - 0.2, result
