"""The VAE and the two-level HVAE of the VampPrior paper (Tomczak & Welling 2018, §4, §5.1) for binary images.

Every network is an MLP of gated dense layers, h = (W·a + b) ⊙ sigmoid(V·a + c) (the paper's element-wise
non-linearity), two hidden layers of `hidden` units (300 in the paper), `latent_dim` units per latent
level (40), diagonal Gaussians with log σ² clamped to [−6, 2], and a Bernoulli decoder:

    levels = 1   q(z|x)                 p(x|z) p(z)
    levels = 2   q(z2|x) q(z1|x, z2)    p(x|z1, z2) p(z1|z2) p(z2)
    prior        p(z) / p(z2) = N(0, I) ("standard") or the VampPrior (1/K) Σ_k q(z|u_k) ("vamp")

Networks taking two inputs (q(z1|x, z2), p(x|z1, z2)) run one gated layer per input, concatenate, and
run one more gated layer. Latent levels are listed top first, as in NVAE: [z2, z1] (or [z]).

Data. The model is a density on binary grey images of `image_size`² pixels. Input tensors are
[B, C, H, W] in [−1, 1] as everywhere in the project (the bundled digits are grey replicated to C = 3):
the channels are averaged to grey and every pass draws a binarization b ~ Bernoulli((x + 1)/2) (dynamic
binarization, the paper's "dynamic MNIST"); a binary input (±1) passes unchanged, so a fixed binarized
test set gives a fixed likelihood target. Image outputs are [B, C, H, W] in [−1, 1], grey replicated:
x_mean = 2·p − 1 with p the Bernoulli mean.

Noise ↔ (z, x) map (README, Design), at temperature t (which scales the prior σ's; a Bernoulli has no σ):
    z2 = t·ε_z2 (standard) or z2 = μ_k + t·σ_k·ε_z2 with k picked by ε_k (vamp, `models/vampprior.py`)
    z1 = μ_p(z2) + t·σ_p(z2)·ε_z1
    x  = +1 where Φ(ε_x) < p(z), −1 elsewhere (channel 0 of ε_x; every channel of x is the same)
The noise list is [ε_z2, ε_z1] (standard) or [ε_z2, ε_z1, ε_k] (vamp; `latent_shapes` lists (1,) for
ε_k last). The map to x is a step function of ε_x: noise-space Langevin on ε_x (VAEBM) is refused; on
ε_z it is exact (the joint latent EBM prior, latent tilting on x_mean), with a VampPrior's ε_k held fixed
per chain (`held_noise`).

`forward` draws its posterior noise and binarization from the global RNG (it takes no `posterior_eps`),
so the NVAE trainer's `data.split=global` mode is refused for these models; everything else of the
trainer (checkpoints, exact resume, EMA, TensorBoard, export) works as for the NVAE.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import vampprior
from models.configs import HVAE_PRIORS as PRIORS  # noqa: F401 (re-exported)
from models.configs import HVAEConfig
from models.nvae.model import Generation, NVAEOutput
from models.vampprior import VampPrior

_LOG_2PI = math.log(2.0 * math.pi)


class GatedDense(nn.Module):
    """[N, in] → [N, out]: (W·a + b) ⊙ sigmoid(V·a + c)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, 2 * out_dim)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        """[N, in] → [N, out], gated."""
        value, gate = self.linear(a).chunk(2, dim=-1)
        return value * torch.sigmoid(gate)


class TwoInputNet(nn.Module):
    """([N, in_a], [N, in_b]) → [N, hidden]: a gated layer per input, concatenated, one more gated layer."""

    def __init__(self, in_a: int, in_b: int, hidden: int):
        super().__init__()
        self.branch_a, self.branch_b = GatedDense(in_a, hidden), GatedDense(in_b, hidden)
        self.joint = GatedDense(2 * hidden, hidden)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """([N, in_a], [N, in_b]) → [N, hidden]."""
        return self.joint(torch.cat([self.branch_a(a), self.branch_b(b)], dim=-1))


class GaussianHead(nn.Module):
    """[N, hidden] → (μ, σ) [N, M] each, log σ² clamped to [min, max] (σ ∈ [0.05, 2.7] by default)."""

    def __init__(self, hidden: int, latent: int, min_log_var: float, max_log_var: float):
        super().__init__()
        self.mean, self.log_var = nn.Linear(hidden, latent), nn.Linear(hidden, latent)
        self.bounds = (min_log_var, max_log_var)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, hidden] → (μ, σ), each [N, M]."""
        return self.mean(h), torch.exp(0.5 * self.log_var(h).clamp(*self.bounds))


def _gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """log N(z; μ, σ²) summed over the last dimension."""
    normalized = (z - mu) / sigma
    return (-0.5 * normalized * normalized - torch.log(sigma) - 0.5 * _LOG_2PI).sum(-1)


class HVAE(nn.Module):
    """See the module docstring. The public API has the names and semantics of `models.nvae.model.NVAE`."""

    def __init__(self, cfg: HVAEConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        pixels, hidden, latent, bounds = cfg.image_size**2, cfg.hidden, cfg.latent_dim, (cfg.min_log_var, cfg.max_log_var)
        two_layers = lambda in_dim: nn.Sequential(GatedDense(in_dim, hidden), GatedDense(hidden, hidden))
        # The top level's posterior q(z_top|x), also the VampPrior's component network.
        self.q_top = nn.Sequential(two_layers(pixels), GaussianHead(hidden, latent, *bounds))
        if cfg.levels == 2:
            self.q_z1_net, self.q_z1_head = TwoInputNet(pixels, latent, hidden), GaussianHead(hidden, latent, *bounds)
            self.p_z1 = nn.Sequential(two_layers(latent), GaussianHead(hidden, latent, *bounds))
            self.p_x_net = TwoInputNet(latent, latent, hidden)
        else:
            self.p_x_net = two_layers(latent)
        self.p_x_logits = nn.Linear(hidden, pixels)
        self.vamp = VampPrior(cfg.pseudo_inputs, (pixels,), cfg.pseudo_init) if cfg.prior == "vamp" else None
        self.gradient_checkpointing = False  # accepted for NVAE compatibility; nothing to checkpoint
        self.num_groups = cfg.levels
        self.groups_per_scale_decoder_order = [cfg.levels]  # one "scale": KL balancing would weigh levels equally

    # ------------------------------------------------------------------------------------------
    # Shapes (names as in NVAE).

    @property
    def latent_shapes(self) -> list[tuple[int]]:
        """Noise shapes, top level first; a VampPrior adds its component selector (1,) last."""
        return [(self.cfg.latent_dim,)] * self.cfg.levels + ([(1,)] if self.vamp is not None else [])

    @property
    def held_noise(self) -> tuple[int, ...]:
        """Indices into `latent_shapes` that noise-space Langevin carries unchanged: the VampPrior's component
        selector ε_k (z is piecewise constant in it; each chain keeps its component); () otherwise."""
        return (self.cfg.levels,) if self.vamp is not None else ()

    @property
    def z_shapes(self) -> list[tuple[int]]:
        """Shapes of the latents z themselves, top level first (without the selector)."""
        return [(self.cfg.latent_dim,)] * self.cfg.levels

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the model's images."""
        return (self.cfg.in_channels, self.cfg.image_size, self.cfg.image_size)

    # ------------------------------------------------------------------------------------------
    # Data ↔ binary pixel vectors.

    def binarize(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] in [−1, 1] → b [B, H·W] in {0, 1}: grey = channel mean, b ~ Bernoulli((grey + 1)/2)."""
        probs = ((x.float().mean(dim=1).flatten(1) + 1.0) / 2.0).clamp(0.0, 1.0)
        return torch.bernoulli(probs)

    def to_images(self, values: torch.Tensor) -> torch.Tensor:
        """[N, H·W] in [0, 1] → [N, C, H, W] in [−1, 1] (grey replicated to C channels)."""
        return self._replicate(2.0 * values - 1.0)

    def _replicate(self, grey: torch.Tensor) -> torch.Tensor:
        """[N, H·W] → [N, C, H, W], the same values in every channel."""
        size = self.cfg.image_size
        return grey.unflatten(-1, (1, size, size)).expand(-1, self.cfg.in_channels, size, size)

    # ------------------------------------------------------------------------------------------
    # The networks.

    def q_z1(self, b: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z1 | x, z2): binarized images b [N, H·W] and z2 [N, M] → (μ, σ), each [N, M]."""
        return self.q_z1_head(self.q_z1_net(b, z2))

    def decoder_logits(self, z: list[torch.Tensor]) -> torch.Tensor:
        """Latents, top first ([z2, z1] or [z]) → Bernoulli logits [N, H·W]."""
        hidden = self.p_x_net(z[1], z[0]) if self.cfg.levels == 2 else self.p_x_net(z[0])
        return self.p_x_logits(hidden)

    def prior_components(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The VampPrior's components (μ_k, σ_k) [K, M] each: q(z_top | u_k)."""
        return self.q_top(self.vamp.pseudo_inputs())

    def pseudo_input_images(self) -> torch.Tensor:
        """The VampPrior's pseudo-inputs as images [K, C, H, W] in [−1, 1]."""
        return self.to_images(self.vamp.pseudo_inputs())

    @property
    def pseudo_inputs_from_data(self) -> int:
        """How many training images the trainer should hand to `init_pseudo_inputs` (0: none)."""
        return self.cfg.pseudo_inputs if self.vamp is not None and self.cfg.pseudo_init == "data" else 0

    def init_pseudo_inputs(self, images: torch.Tensor) -> None:
        """Start the pseudo-inputs at training images [K, C, H, W] in [−1, 1] (grey levels, not binarized)."""
        self.vamp.initialize_from((images.float().mean(dim=1).flatten(1) + 1.0) / 2.0)

    # ------------------------------------------------------------------------------------------
    # Densities along a posterior sample.

    def _posterior_pass(self, b: torch.Tensor, posterior_eps: list[torch.Tensor], components=None) -> dict:
        """z ~ q(z|b) along the given noise (top first) and every log-density term [N] (at temperature 1)."""
        mu_top, sigma_top = self.q_top(b)
        z_top = mu_top + sigma_top * posterior_eps[0]
        terms = {"z": [z_top], "log_q": _gaussian_log_prob(z_top, mu_top, sigma_top), "top": (mu_top, sigma_top)}
        if self.vamp is None:
            terms["log_p"] = _gaussian_log_prob(z_top, torch.zeros_like(z_top), torch.ones_like(z_top))
        else:
            mu_k, sigma_k = self.prior_components() if components is None else components
            terms["log_p"] = vampprior.mixture_log_prob(z_top, mu_k, sigma_k)
        if self.cfg.levels == 2:
            mu_q1, sigma_q1 = self.q_z1(b, z_top)
            z1 = mu_q1 + sigma_q1 * posterior_eps[1]
            mu_p1, sigma_p1 = self.p_z1(z_top)
            terms["z"].append(z1)
            terms["log_q"] = terms["log_q"] + _gaussian_log_prob(z1, mu_q1, sigma_q1)
            terms["log_p"] = terms["log_p"] + _gaussian_log_prob(z1, mu_p1, sigma_p1)
            terms["z1"] = (mu_q1, sigma_q1, mu_p1, sigma_p1)
        terms["logits"] = self.decoder_logits(terms["z"])
        terms["log_px"] = -F.binary_cross_entropy_with_logits(terms["logits"], b, reduction="none").sum(-1)
        return terms

    # ------------------------------------------------------------------------------------------
    # Public passes (as in NVAE).

    def forward(self, x: torch.Tensor) -> NVAEOutput:
        """Training pass: x [B, C, H, W] → log p(b|z) [B] and the KL of every level [B], top first.

        Standard-prior KLs and KL(q(z1|x,z2) ‖ p(z1|z2)) are analytic (given the sampled z2); a
        VampPrior's KL is the one-sample estimate log q(z|x) − log p(z). `kl_per_channel` of a VampPrior
        level is the KL between 1-D marginals (`vampprior.marginal_log_probs`), a per-unit diagnostic
        that does not sum to the level's KL.
        """
        b = self.binarize(x)
        eps = [torch.randn(b.shape[0], self.cfg.latent_dim, device=b.device) for _ in range(self.cfg.levels)]
        components = self.prior_components() if self.vamp is not None else None
        terms = self._posterior_pass(b, eps, components)
        (mu_top, sigma_top), z_top = terms["top"], terms["z"][0]
        if self.vamp is None:
            per_unit = [0.5 * (mu_top**2 + sigma_top**2 - 1.0) - torch.log(sigma_top)]
            kls = [per_unit[0].sum(-1)]
        else:
            mu_k, sigma_k = components
            log_q = -0.5 * eps[0] ** 2 - torch.log(sigma_top) - 0.5 * _LOG_2PI  # [B, M]
            per_unit = [log_q - vampprior.marginal_log_probs(z_top, mu_k, sigma_k)]
            kls = [log_q.sum(-1) - vampprior.mixture_log_prob(z_top, mu_k, sigma_k)]
        if self.cfg.levels == 2:
            mu_q1, sigma_q1, mu_p1, sigma_p1 = terms["z1"]
            ratio = sigma_q1 / sigma_p1
            per_unit.append(0.5 * (((mu_q1 - mu_p1) / sigma_p1) ** 2 + ratio**2 - 1.0) - torch.log(ratio))
            kls.append(per_unit[1].sum(-1))
        return NVAEOutput(
            x_mean=self.to_images(torch.sigmoid(terms["logits"])),
            x_log_sigma=self._log_std(terms["logits"]),
            recon_log_prob=terms["log_px"],
            kl_per_group=kls,
            kl_per_channel=[unit.mean(dim=0) for unit in per_unit],
            z=terms["z"],
        )

    def _log_std(self, logits: torch.Tensor) -> torch.Tensor:
        """log of the Bernoulli pixel's standard deviation in [−1, 1] units, log 2√(p(1−p)), as images."""
        return self._replicate(math.log(2.0) + 0.5 * (F.logsigmoid(logits) + F.logsigmoid(-logits)))

    def decode(self, eps_z: list[torch.Tensor], eps_x: torch.Tensor | None = None, temperature: float = 1.0) -> Generation:
        """ε → (z, x) as in the module docstring. eps_z: `latent_shapes`, each [B, ...]; eps_x [B, C, H, W] or None."""
        if len(eps_z) != len(self.latent_shapes):
            raise ValueError(f"decode expects {len(self.latent_shapes)} noise tensors, got {len(eps_z)}")
        if self.vamp is None:
            z = [temperature * eps_z[0]]
        else:
            z = [vampprior.sample(eps_z[0], eps_z[-1], *self.prior_components(), temperature)]
        if self.cfg.levels == 2:
            mu_p1, sigma_p1 = self.p_z1(z[0])
            z.append(mu_p1 + temperature * sigma_p1 * eps_z[1])
        logits = self.decoder_logits(z)
        probs = torch.sigmoid(logits)
        x_sample = None
        if eps_x is not None:
            if eps_x.requires_grad and eps_x.is_leaf:  # what Langevin differentiates
                raise ValueError("a Bernoulli decoder's sample is a step function of ε_x: noise-space Langevin on "
                                 "ε_x (VAEBM) is not defined for this binary-data model")
            below = torch.special.ndtr(eps_x[:, 0].flatten(1)) < probs
            x_sample = self.to_images(below.to(probs.dtype))
        return Generation(z=z, x_mean=self.to_images(probs), x_log_sigma=self._log_std(logits), x_sample=x_sample)

    def latents_to_noise(
        self, z: list[torch.Tensor], x: torch.Tensor | None = None, temperature: float = 1.0
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """([z2, z1] or [z], x binary [B, C, H, W] or None) → (ε_z, ε_x or None) with decode(ε_z, ε_x, t) = (z, x).

        ε_x is the middle of the interval of Φ(ε_x) that decodes to each pixel: Φ⁻¹(p/2) for +1, Φ⁻¹((1+p)/2) for −1.
        """
        if self.vamp is None:
            eps_z = [z[0] / temperature]
        else:
            eps_top, eps_k = vampprior.invert(z[0], *self.prior_components(), temperature)
            eps_z = [eps_top]
        if self.cfg.levels == 2:
            mu_p1, sigma_p1 = self.p_z1(z[0])
            eps_z.append((z[1] - mu_p1) / (temperature * sigma_p1))
        if self.vamp is not None:
            eps_z.append(eps_k)
        if x is None:
            return eps_z, None
        probs = torch.sigmoid(self.decoder_logits(z))
        on = x.float().mean(dim=1).flatten(1) > 0
        uniform = torch.where(on, probs / 2, (1.0 + probs) / 2).double().clamp(1e-12, 1 - 1e-12)
        return eps_z, self._replicate(torch.special.ndtri(uniform).to(probs.dtype))

    def posterior_noise(
        self, x: torch.Tensor, posterior_eps: list[torch.Tensor], temperature: float = 1.0
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """(ε_z, ε_x, log w) along z ~ q(z|b) drawn with the given noise (one tensor per `latent_shapes`
        entry; a VampPrior's selector entry is unused); log w = log p(b|z) + log p(z) − log q(z|b) [B] at
        temperature 1. b is x binarized (x itself when binary). Same contract as `NVAE.posterior_noise`."""
        b = self.binarize(x)
        terms = self._posterior_pass(b, posterior_eps)
        eps_z, eps_x = self.latents_to_noise(terms["z"], self.to_images(b), temperature)
        return eps_z, eps_x, terms["log_px"] + terms["log_p"] - terms["log_q"]

    def encode_noise(
        self, x: torch.Tensor, temperature: float = 1.0, sample: bool = True, generator: torch.Generator | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x → (ε_z, ε_x), the inverse of `decode` along z ~ q(z|b) (the posterior means when sample=False)."""
        draw = (lambda shape: torch.randn(shape, generator=generator, device=x.device)) if sample \
            else (lambda shape: torch.zeros(shape, device=x.device))
        eps_z, eps_x, _ = self.posterior_noise(x, [draw((x.shape[0], *s)) for s in self.latent_shapes], temperature)
        return eps_z, eps_x

    def prior_log_prob(self, z: list[torch.Tensor]) -> torch.Tensor:
        """log p(z) [B] of given latents (top first) at temperature 1, differentiable in the prior's parameters."""
        if self.vamp is None:
            log_p = _gaussian_log_prob(z[0], torch.zeros_like(z[0]), torch.ones_like(z[0]))
        else:
            log_p = vampprior.mixture_log_prob(z[0], *self.prior_components())
        if self.cfg.levels == 2:
            log_p = log_p + _gaussian_log_prob(z[1], *self.p_z1(z[0]))
        return log_p

    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> Generation:
        """Draw ε ~ N(0, I) (with `generator`) and `decode` them at `temperature`."""
        device = self.p_x_logits.weight.device if device is None else torch.device(device)
        eps = [torch.randn((n, *shape), generator=generator, device=device) for shape in [*self.latent_shapes, self.image_shape]]
        return self.decode(eps[:-1], eps[-1], temperature)

    # ------------------------------------------------------------------------------------------
    # Evaluation.

    @torch.no_grad()
    def log_likelihood(self, x: torch.Tensor, num_samples: int, batch: int = 65536,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Importance-sampled log p(b) [B] (Burda et al. 2015): log (1/S) Σ_s p(b, z_s)/q(z_s|b), z_s ~ q(z|b).

        A stochastic lower bound, the one-sample ELBO at S = 1, tightening as S grows. Pass binary x (±1):
        gray input is binarized once here. Samples go through the networks in chunks of about `batch` rows.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}")
        b = self.binarize(x)
        components = self.prior_components() if self.vamp is not None else None
        per_chunk = max(1, batch // b.shape[0])
        partial = []  # logsumexp over each chunk of samples, [B] each
        for start in range(0, num_samples, per_chunk):
            k = min(per_chunk, num_samples - start)
            eps = [torch.randn((k * b.shape[0], self.cfg.latent_dim), generator=generator, device=b.device)
                   for _ in range(self.cfg.levels)]
            terms = self._posterior_pass(b.repeat(k, 1), eps, components)
            log_w = (terms["log_px"] + terms["log_p"] - terms["log_q"]).view(k, b.shape[0])
            partial.append(torch.logsumexp(log_w, dim=0))
        return torch.logsumexp(torch.stack(partial), dim=0) - math.log(num_samples)

    @torch.no_grad()
    def posterior_means(self, x: torch.Tensor, num_samples: int = 64,
                        generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """E_q[z_l | b] per level, top first, each [B, M]: the statistic of active units (Burda et al. 2015).

        E_q[z2|b] = μ_q(b) exactly; E_q[z1|b] = E_{z2~q(z2|b)} μ_q(b, z2), averaged over `num_samples` z2's.
        """
        b = self.binarize(x)
        mu_top, sigma_top = self.q_top(b)
        means = [mu_top]
        if self.cfg.levels == 2:
            eps = torch.randn((num_samples, *mu_top.shape), generator=generator, device=b.device)
            z2 = (mu_top + sigma_top * eps).flatten(0, 1)  # [S·B, M]
            means.append(self.q_z1(b.repeat(num_samples, 1), z2)[0].view(num_samples, *mu_top.shape).mean(dim=0))
        return means

    # ------------------------------------------------------------------------------------------
    # Regularizers: no convs and no BN, so both are 0 and the NVAE loss code runs unchanged.

    def spectral_loss(self) -> torch.Tensor:
        """No spectral penalty for this VAE: 0 (kept so every VAE offers the same calls)."""
        return self.p_x_logits.weight.new_zeros(())

    def bn_loss(self) -> torch.Tensor:
        """No BN penalty for this VAE: 0 (kept so every VAE offers the same calls)."""
        return self.p_x_logits.weight.new_zeros(())
