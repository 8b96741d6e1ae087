"""NVAE: a deep hierarchical VAE (Vahdat & Kautz 2020) with the Gaussian decoder of VAEBM.

Data flow (as in the official NVAE code), for x in [−1, 1] (README, Design: data range):

    encoder (bottom-up)   x → stem → preprocess (½) → groups of cells, scale by scale (½ between
                          scales) → enc0; each group's output is kept for the posterior below.
    decoder (top-down)    prior_ftr0 (a learned constant) → for each group l (top first):
                            cells (none before l = 0; an up cell opens each new scale)
                            prior  p(z_l | z_<l) = N(dec_sampler(state))   (l = 0: N(0, 1.01²))
                            post.  q(z_l | x, z_<l) = N(prior_raw + enc_sampler(combine(enc_l, state)))
                                   then the posterior flows (if any)
                            state ← combiner(concat(state, z_l))
                          → postprocess (×2) → ELU → conv3×3 → (μ_x, log σ_x).

The generative path is a deterministic map of standard-normal noise (README, Design):
z_0 = t·1.01·ε_0, z_l = μ_p,l + t·σ_p,l·ε_l, x = μ_x + t·σ_x·ε_x. `decode` computes it and
`encode_noise` inverts it along a posterior sample.

VampPrior top group (`prior: vamp`, Tomczak & Welling 2018 §3; `models/vampprior.py`). The fixed
N(0, 1.01²) of the top group z_1 = z_0 here (group index 0) is replaced by the mixture of the encoder's
own top-group posteriors at K learned pseudo-images u_k [K, C, H, W]:

    p(z_0) = (1/K) Σ_k q(z_0 | u_k),   log p(z_0) = logsumexp_k log q(z_0 | u_k) − log K

each component a diagonal Gaussian over the whole group (log-probs summed over its C·h·w dimensions
before the logsumexp). With posterior flows the components are the Gaussians q₀(z_0 | u_k) before the
flows (still a learned mixture, evaluated at the flowed z_0). Training: the pseudo-images go through the
encoder in the same batch as the data (one BN pass), and the top group's KL is the one-sample estimate
log q(z_0|x) − log p(z_0). Generation: the components come from encoding the pseudo-images with the
encoder BN layers in eval mode (running statistics), recomputed at every call, and the top group has two
noise tensors: z_0 = μ_k + t·σ_k·ε_0 with k picked by the selector ε_k [B, 1], which is listed LAST in
`latent_shapes` ([ε_0, …, ε_{L−1}, ε_k]). z is piecewise constant in ε_k, so noise-space Langevin
holds it fixed: `held_noise` names it, and `models.langevin.langevin` carries it along unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from models import vampprior
from models.layers import Conv2d
from models.nvae.bn_stats import BNStatisticsMixin
from models.nvae.cells import (
    DecoderCombiner,
    ELUConv,
    EncoderCell,
    EncoderCombiner,
    MBConvCell,
    run_cell,
)
from models.nvae.config import NVAEConfig
from models.nvae.distributions import Normal
from models.nvae.flows import PairedFlow
from models.nvae.vamp_top import VampTopMixin
from models.spectral import SpectralRegularizer, collect_convs
from models.vampprior import VampPrior

DECODER_EXPANSION = 6  # mconv_e6k5g0 in the decoder tower
POSTPROCESS_EXPANSION = 3  # mconv_e3k5g0 in the postprocess blocks


@dataclass
class NVAEOutput:
    """What a training forward pass returns (B = batch, L = number of latent groups)."""

    x_mean: torch.Tensor  # [B, C, H, W] decoder mean after the soft clamp, [−1, 1] units
    x_log_sigma: torch.Tensor  # [B, C, H, W] log of the decoder σ (σ = exp(clamped log σ) + 0.01)
    recon_log_prob: torch.Tensor  # [B] log N(x; μ_x, σ_x²) of the (quantized) input, summed over C, H, W
    kl_per_group: list[torch.Tensor]  # L × [B] KL of each group, summed over its C, h, w
    kl_per_channel: list[torch.Tensor]  # L × [latents_per_group] batch-mean KL per channel
    z: list[torch.Tensor]  # L × [B, latents, h, w] posterior samples (after the flows), top first


@dataclass
class Generation:
    """The reparameterization ε → (z, x) at one temperature."""

    z: list[torch.Tensor]  # L × [B, latents, h, w], top first
    x_mean: torch.Tensor  # [B, C, H, W] decoder mean (soft-clamped, not hard-clamped)
    x_log_sigma: torch.Tensor  # [B, C, H, W] log σ_x at temperature 1
    x_sample: torch.Tensor | None  # [B, C, H, W] x_mean + t·σ_x·ε_x (not clamped), None without ε_x


# A decoder-tower callback: (group index, decoder state [B, C, h, w], raw prior params
# [B, 2L, h, w] or None for the top group) → the z_l the decoder continues with.
LatentFn = Callable[[int, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class NVAE(BNStatisticsMixin, VampTopMixin, nn.Module):
    """NVAE with a Gaussian decoder; see the module docstring for the data flow."""

    def __init__(self, cfg: NVAEConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.gradient_checkpointing = cfg.gradient_checkpointing  # settable on the instance
        # Activation layout (the weights keep the default one, so weight norm stays cheap).
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        cell_args = dict(use_se=cfg.use_se, bn_momentum=cfg.bn_momentum, bn_eps=cfg.bn_eps)
        latents = cfg.latents_per_group
        num_scales = cfg.num_latent_scales
        groups_enc_order = cfg.groups_per_scale_encoder_order()
        self.groups_per_scale_decoder_order = cfg.groups_per_scale_decoder_order()
        self.num_groups = sum(groups_enc_order)
        # Decoder scale of each group (0 = top, lowest resolution).
        self._group_scale = [s for s, n in enumerate(self.groups_per_scale_decoder_order) for _ in range(n)]

        # --- Encoder: stem, preprocess blocks (each ends by halving), tower of latent scales. ---
        channels = cfg.channels_enc
        self.stem = Conv2d(cfg.in_channels, channels, 3, padding=1, bias=True)
        preprocess = []
        for _ in range(cfg.preprocess_blocks):
            preprocess += [EncoderCell(channels, channels, 1, **cell_args) for _ in range(cfg.preprocess_cells - 1)]
            preprocess.append(EncoderCell(channels, 2 * channels, 2, **cell_args))
            channels *= 2
        self.preprocess = nn.ModuleList(preprocess)
        self.encoder_groups = nn.ModuleList()  # one Sequential of cells per group, bottom-up order
        self.encoder_down = nn.ModuleList()  # a down cell between consecutive scales
        enc_channels = []  # encoder channels per scale, bottom-up
        for scale, count in enumerate(groups_enc_order):
            for _ in range(count):
                cells = [EncoderCell(channels, channels, 1, **cell_args) for _ in range(cfg.cells_per_cond_enc)]
                self.encoder_groups.append(nn.Sequential(*cells))
            enc_channels.append(channels)
            if scale < num_scales - 1:
                self.encoder_down.append(EncoderCell(channels, 2 * channels, 2, **cell_args))
                channels *= 2
        self.encoder_top = ELUConv(channels, channels, 1, elu_after=True)  # "enc0"
        enc_channels_dec_order = enc_channels[::-1]

        # --- Decoder tower, top scale first. ---
        dec_channels_top = cfg.channels_dec * cfg.top_multiplier
        dec_channels = [dec_channels_top // 2**s for s in range(num_scales)]  # per decoder scale
        top = cfg.top_resolution
        self.prior_ftr0 = nn.Parameter(torch.rand(dec_channels_top, top, top))  # U[0, 1), as officially
        self.decoder_groups = nn.ModuleList()  # cells run before each group (none for the top group)
        self.decoder_up = nn.ModuleList()  # the up cell that opens each new scale
        self.enc_samplers = nn.ModuleList()  # posterior params (or their residual) from the encoder side
        self.enc_combiners = nn.ModuleList()  # for groups 1..L-1
        self.dec_samplers = nn.ModuleList()  # prior params, groups 1..L-1
        self.dec_combiners = nn.ModuleList()
        self.flows = nn.ModuleList()
        for g, scale in enumerate(self._group_scale):
            c_dec, c_enc = dec_channels[scale], enc_channels_dec_order[scale]
            if g > 0 and scale != self._group_scale[g - 1]:
                self.decoder_up.append(MBConvCell(2 * c_dec, c_dec, DECODER_EXPANSION, True, **cell_args))
            count = 0 if g == 0 else cfg.cells_per_cond_dec
            cells = [MBConvCell(c_dec, c_dec, DECODER_EXPANSION, False, **cell_args) for _ in range(count)]
            self.decoder_groups.append(nn.Sequential(*cells))
            self.enc_samplers.append(Conv2d(c_enc, 2 * latents, 3, padding=1, bias=True))
            if g > 0:
                self.enc_combiners.append(EncoderCombiner(c_dec, c_enc))
                self.dec_samplers.append(ELUConv(c_dec, 2 * latents, 1))
            self.dec_combiners.append(DecoderCombiner(c_dec, latents))
            self.flows.append(nn.Sequential(*[PairedFlow(latents) for _ in range(cfg.num_flows)]))

        # --- Postprocess blocks (each starts by doubling) and the output head. ---
        channels = dec_channels[-1]
        postprocess = []
        for _ in range(cfg.postprocess_blocks):
            postprocess.append(MBConvCell(channels, channels // 2, POSTPROCESS_EXPANSION, True, **cell_args))
            channels //= 2
            postprocess += [
                MBConvCell(channels, channels, POSTPROCESS_EXPANSION, False, **cell_args)
                for _ in range(cfg.postprocess_cells - 1)
            ]
        self.postprocess = nn.ModuleList(postprocess)
        self.output_head = ELUConv(channels, 2 * cfg.in_channels, 3)  # (μ_x, log σ_x)

        # Built last so it sees every conv; its u/v buffers live in the state dict.
        self.spectral = SpectralRegularizer(collect_convs(self))
        self._bn_cache: dict[str, dict[str, torch.Tensor]] = {}
        # Built last, so a standard-prior model draws exactly the initial weights it always did.
        self.vamp = VampPrior(cfg.pseudo_inputs, self.image_shape, cfg.pseudo_init, value_range=(-1.0, 1.0)) \
            if cfg.prior == "vamp" else None

    # ------------------------------------------------------------------------------------------
    # Shapes.

    @property
    def latent_shapes(self) -> list[tuple[int, ...]]:
        """Per-sample shapes of the latent noise ε_z: (latents, h, w) of every group in decoding order (top,
        lowest resolution, first); a VampPrior top group adds its component selector ε_k, (1,), last."""
        return [*self.z_shapes, *([(1,)] if self.vamp is not None else [])]

    @property
    def z_shapes(self) -> list[tuple[int, int, int]]:
        """(latents, h, w) of the latents z themselves, one per group, top first (what `Generation.z` holds)."""
        top = self.cfg.top_resolution
        return [(self.cfg.latents_per_group, top * 2**s, top * 2**s) for s in self._group_scale]

    @property
    def held_noise(self) -> tuple[int, ...]:
        """Indices into `latent_shapes` of noise that noise-space Langevin must carry unchanged: the
        VampPrior's component selector ε_k (z does not depend smoothly on it); () otherwise."""
        return (self.num_groups,) if self.vamp is not None else ()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the model's images."""
        return (self.cfg.in_channels, self.cfg.image_size, self.cfg.image_size)

    # ------------------------------------------------------------------------------------------
    # Building blocks of the passes.

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Reduce [−1, 1] input to num_x_bits (the official code's pre-processing, in [−1, 1] units).

        The input is first rounded to its 8-bit level, so float error in (x+1)/2·255 cannot drop
        a pixel into the bin below.
        """
        bits = self.cfg.num_x_bits
        if bits >= 8:
            return x
        levels = torch.round((x + 1.0) * 127.5).clamp(0, 255)
        reduced = torch.floor(levels / 2 ** (8 - bits)) / (2**bits - 1)
        return 2.0 * reduced - 1.0

    def _run(self, cell: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return run_cell(cell, x, self.gradient_checkpointing)

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x [B, C, H, W] → (top feature, the encoder feature of groups 1..L-1 in decoder order)."""
        s = self.stem(x.contiguous(memory_format=self.memory_format))
        for cell in self.preprocess:
            s = self._run(cell, s)
        features, g = [], 0
        for scale, count in enumerate(self.groups_per_scale_decoder_order[::-1]):
            for _ in range(count):
                for cell in self.encoder_groups[g]:
                    s = self._run(cell, s)
                features.append(s)
                g += 1
            if scale < len(self.encoder_down):
                s = self._run(self.encoder_down[scale], s)
        features.pop()  # the top group reads encoder_top(s) instead
        return self.encoder_top(s), features[::-1]

    def _posterior(
        self, g: int, state: torch.Tensor, prior_params: torch.Tensor | None, top: torch.Tensor, features: list[torch.Tensor]
    ) -> Normal:
        """q(z_g | x, z_<g) before the flows."""
        if g == 0:  # the prior is fixed, so no residual form
            return Normal.from_params(self.enc_samplers[0](top))
        params = self.enc_samplers[g](self.enc_combiners[g - 1](features[g - 1], state))
        if self.cfg.residual_posterior:
            params = params + prior_params  # raw prior outputs added before the soft clamp
        return Normal.from_params(params)

    def _apply_flows(self, g: int, z: torch.Tensor) -> torch.Tensor:
        for flow in self.flows[g]:
            z = self._run(flow, z)
        return z

    def _decoder(self, batch: int, latent_fn: LatentFn) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Run the decoder tower, asking `latent_fn` for each z_l; → (z's, output params [B, 2C, H, W])."""
        s = self.prior_ftr0.unsqueeze(0).expand(batch, -1, -1, -1).contiguous(memory_format=self.memory_format)
        zs = []
        for g, scale in enumerate(self._group_scale):
            prior_params = None
            if g > 0:
                if scale != self._group_scale[g - 1]:
                    s = self._run(self.decoder_up[scale - 1], s)
                for cell in self.decoder_groups[g]:
                    s = self._run(cell, s)
                prior_params = self.dec_samplers[g - 1](s)
            z = latent_fn(g, s, prior_params)
            zs.append(z)
            s = self.dec_combiners[g](s, z.to(dtype=s.dtype, memory_format=self.memory_format))
        for cell in self.postprocess:
            s = self._run(cell, s)
        return zs, self.output_head(s)

    @staticmethod
    def _prior(z_like: torch.Tensor, prior_params: torch.Tensor | None, temperature: float = 1.0) -> Normal:
        """p(z_l | z_<l); the top group's is the fixed N(0, 1.01²)."""
        if prior_params is None:
            return Normal.standard(z_like, temperature)
        return Normal.from_params(prior_params, temperature)

    # ------------------------------------------------------------------------------------------
    # Public passes.

    def forward(self, x: torch.Tensor, posterior_eps: list[torch.Tensor] | None = None) -> NVAEOutput:
        """Training pass: x [B, C, H, W] in [−1, 1] → reconstruction and KL terms.

        `posterior_eps`: the standard-normal noise of each group's posterior sample (L × [B, latents,
        h, w], e.g. drawn per global sample by the trainer; a VampPrior's extra selector entry is
        unused); None draws it from the global RNG.

        VampPrior top group: the pseudo-images u [K, C, H, W] are encoded in the same batch as x, so
        train-mode BN normalizes both with one set of statistics, and the components (μ_k, σ_k) carry
        gradients to the pseudo-images. Its KL is the one-sample estimate log q(z_0|x) − log p(z_0);
        its `kl_per_channel` is the KL between 1-D marginals (a per-unit diagnostic that does not sum
        to the group's KL, as in `models/hvae.py`).
        """
        x = self.quantize(x)
        batch = x.shape[0]
        components = None
        if self.vamp is None:
            top, features = self._encode(x)
        else:
            top_all, features_all = self._encode(torch.cat([x, self.vamp.pseudo_inputs().to(x.dtype)]))
            top, features = top_all[:batch], [f[:batch] for f in features_all]
            components = self._components(top_all[batch:])
        kl_per_group, kl_per_channel = [], []

        def posterior_latent(g: int, state: torch.Tensor, prior_params: torch.Tensor | None) -> torch.Tensor:
            q = self._posterior(g, state, prior_params, top, features)
            z0 = q.sample() if posterior_eps is None else q.sample_given_eps(posterior_eps[g])
            z = self._apply_flows(g, z0)
            if g == 0 and components is not None:
                log_q = q.log_prob(z0)  # [B, C, h, w]; flows are volume-preserving
                flat = z.flatten(1)
                kl_per_group.append(log_q.sum(dim=(1, 2, 3)) - vampprior.mixture_log_prob(flat, *components))
                marginal = vampprior.marginal_log_probs(flat, *components).view_as(log_q)
                kl_per_channel.append((log_q - marginal).sum(dim=(2, 3)).mean(dim=0))
                return z
            p = self._prior(z, prior_params)
            if self.cfg.num_flows > 0:
                # Volume-preserving flows: log q(z) = log q0(z0); one-sample Monte-Carlo KL.
                kl = q.log_prob(z0) - p.log_prob(z)
            else:
                kl = q.kl(p)
            kl_per_group.append(kl.sum(dim=(1, 2, 3)))
            kl_per_channel.append(kl.sum(dim=(2, 3)).mean(dim=0))
            return z

        zs, out = self._decoder(batch, posterior_latent)
        x_dist = Normal.from_params(out)
        return NVAEOutput(
            x_mean=x_dist.mu,
            x_log_sigma=torch.log(x_dist.sigma),
            recon_log_prob=x_dist.log_prob(x).sum(dim=(1, 2, 3)),
            kl_per_group=kl_per_group,
            kl_per_channel=kl_per_channel,
            z=zs,
        )

    def decode(
        self, eps_z: list[torch.Tensor], eps_x: torch.Tensor | None = None, temperature: float = 1.0
    ) -> Generation:
        """ε → (z, x): z_0 = t·1.01·ε_0, z_l = μ_p,l + t·σ_p,l·ε_l, x = μ_x + t·σ_x·ε_x.

        Temperature scales every prior σ and the decoder σ (README, Design: temperature; the official Gaussian
        decoder ignores it). Differentiable in the ε's. eps_z: one tensor per `latent_shapes` entry,
        L × [B, latents, h, w] (VampPrior: then ε_k [B, 1], and z_0 = μ_k + t·σ_k·ε_0; differentiable in
        ε_0, not in ε_k, which must not require gradients).
        """
        if len(eps_z) != len(self.latent_shapes):
            raise ValueError(f"decode expects {len(self.latent_shapes)} noise tensors, got {len(eps_z)}")
        components = self.prior_components() if self.vamp is not None else None

        def prior_latent(g: int, state: torch.Tensor, prior_params: torch.Tensor | None) -> torch.Tensor:
            if g == 0 and components is not None:
                return vampprior.sample(eps_z[0].flatten(1), eps_z[-1], *components, temperature).view_as(eps_z[0])
            return self._prior(eps_z[g], prior_params, temperature).sample_given_eps(eps_z[g])

        zs, out = self._decoder(eps_z[0].shape[0], prior_latent)
        x_dist = Normal.from_params(out)
        x_sample = None if eps_x is None else x_dist.mu + temperature * x_dist.sigma * eps_x
        return Generation(z=zs, x_mean=x_dist.mu, x_log_sigma=torch.log(x_dist.sigma), x_sample=x_sample)

    def encode_noise(
        self, x: torch.Tensor, temperature: float = 1.0, sample: bool = True, generator: torch.Generator | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(x, posterior z) → (ε_z, ε_x), the inverse of `decode` at `temperature`.

        z ~ q(z|x) (its mean before the flows when sample=False), then ε_l = (z_l − μ_p,l)/(t·σ_p,l)
        and ε_x = (x − μ_x)/(t·σ_x), x quantized as in `forward`.
        """
        draw = (lambda shape: torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)) if sample \
            else (lambda shape: torch.zeros(shape, device=x.device, dtype=x.dtype))
        posterior_eps = [draw((x.shape[0], *shape)) for shape in self.latent_shapes]
        eps_z, eps_x, _ = self.posterior_noise(x, posterior_eps, temperature)
        return eps_z, eps_x

    def posterior_noise(
        self, x: torch.Tensor, posterior_eps: list[torch.Tensor], temperature: float = 1.0
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """(ε_z, ε_x, log w) along z ~ q(z|x) drawn with the given posterior noise (one tensor per group).

        ε's invert `decode` at `temperature`; log w = log p(x|z) + log p(z) − log q(z|x) [B] at
        temperature 1 (an importance weight). Chain i's result depends only on its own noise.
        VampPrior: x is encoded alone, the components come from `prior_components`, and ε_k (appended
        last) picks the component most responsible for z_0 (`vampprior.invert`).
        """
        x = self.quantize(x)
        top, features = self._encode(x)
        components = self.prior_components() if self.vamp is not None else None
        eps_z, log_w, selector = [], [], []

        def posterior_latent(g: int, state: torch.Tensor, prior_params: torch.Tensor | None) -> torch.Tensor:
            q = self._posterior(g, state, prior_params, top, features)
            z0 = q.sample_given_eps(posterior_eps[g])
            z = self._apply_flows(g, z0)
            if g == 0 and components is not None:
                eps_top, eps_k = vampprior.invert(z.flatten(1), *components, temperature)
                eps_z.append(eps_top.view_as(z))
                selector.append(eps_k)
                log_w.append(vampprior.mixture_log_prob(z.flatten(1), *components) - q.log_prob(z0).sum(dim=(1, 2, 3)))
                return z
            eps_z.append(self._prior(z, prior_params, temperature).eps_given_sample(z))
            # Volume-preserving flows: log q(z) = log q0(z0), as in `forward`.
            log_w.append((self._prior(z, prior_params).log_prob(z) - q.log_prob(z0)).sum(dim=(1, 2, 3)))
            return z

        _, out = self._decoder(x.shape[0], posterior_latent)
        x_dist = Normal.from_params(out)
        eps_x = (x - x_dist.mu) / (temperature * x_dist.sigma)
        return eps_z + selector, eps_x, x_dist.log_prob(x).sum(dim=(1, 2, 3)) + torch.stack(log_w).sum(0)

    def prior_log_prob(self, z: list[torch.Tensor]) -> torch.Tensor:
        """log p_θ(z) = Σ_l log p(z_l | z_<l) [B] of GIVEN latents (temperature 1), differentiable in
        the prior's parameters: the decoder tower runs along z (for the joint prior's generator fine-tuning).
        z: L × [B, latents, h, w]. VampPrior top group: log (1/K) Σ_k q(z_0|u_k), components from
        `prior_components` (differentiable in the pseudo-images and the encoder)."""
        log_p = []
        components = self.prior_components() if self.vamp is not None else None

        def given_latent(g: int, state: torch.Tensor, prior_params: torch.Tensor | None) -> torch.Tensor:
            if g == 0 and components is not None:
                log_p.append(vampprior.mixture_log_prob(z[0].flatten(1), *components))
                return z[0]
            log_p.append(self._prior(z[g], prior_params).log_prob(z[g]).sum(dim=(1, 2, 3)))
            return z[g]

        self._decoder(z[0].shape[0], given_latent)
        return torch.stack(log_p, dim=1).sum(dim=1)

    def latents_to_noise(
        self, z: list[torch.Tensor], x: torch.Tensor | None = None, temperature: float = 1.0
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """(z, x) → (ε_z, ε_x): run the decoder along the given z's and invert `decode`.

        ε_x is None when x is None. decode(latents_to_noise(z, x, t), t) reproduces z and x.
        z: L × [B, latents, h, w]; a VampPrior's ε_k (the most responsible component) is appended last.
        """
        eps_z, selector = [], []
        components = self.prior_components() if self.vamp is not None else None

        def given_latent(g: int, state: torch.Tensor, prior_params: torch.Tensor | None) -> torch.Tensor:
            if g == 0 and components is not None:
                eps_top, eps_k = vampprior.invert(z[0].flatten(1), *components, temperature)
                eps_z.append(eps_top.view_as(z[0]))
                selector.append(eps_k)
                return z[0]
            eps_z.append(self._prior(z[g], prior_params, temperature).eps_given_sample(z[g]))
            return z[g]

        _, out = self._decoder(z[0].shape[0], given_latent)
        eps_z = eps_z + selector
        if x is None:
            return eps_z, None
        x_dist = Normal.from_params(out)
        return eps_z, (x - x_dist.mu) / (temperature * x_dist.sigma)

    def sample(
        self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Generation:
        """Draw ε ~ N(0, I) (with `generator`) and `decode` them at `temperature`."""
        device = self.prior_ftr0.device if device is None else torch.device(device)
        dtype = self.prior_ftr0.dtype
        eps_z = [torch.randn((n, *shape), generator=generator, device=device, dtype=dtype) for shape in self.latent_shapes]
        eps_x = torch.randn((n, *self.image_shape), generator=generator, device=device, dtype=dtype)
        return self.decode(eps_z, eps_x, temperature)

    # ------------------------------------------------------------------------------------------
    # Regularizers (NVAE's spectral and BN penalties).

    def spectral_loss(self) -> torch.Tensor:
        """Σ over every conv of the largest singular value of its reshaped kernel (differentiable)."""
        return self.spectral()

    def bn_loss(self) -> torch.Tensor:
        """Σ over affine BN layers of max |γ|."""
        maxima = [m.weight.abs().max() for _, m in self.bn_layers(generative_only=False) if m.weight is not None]
        if not maxima:
            return self.prior_ftr0.new_zeros(())
        return torch.stack(maxima).sum()
