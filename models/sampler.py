"""The sampler of a loaded bundle (`BundleSampler`): one Langevin sampler, per-chain noise.

The bundle's energy method (`models/adapters.py`) decides what Langevin moves: (ε_z, ε_x) for VAEBM,
ε_z only for latent tilting and the joint latent prior (ε_x then stays as drawn).

Sampling (`BundleSampler.sample_indices`; README, Design; VAEBM App. E). Chain i's initial noise and
Langevin noise come from its own generator seeded `chain_seed(seed, i)`, and the networks always run on
chunks of exactly `chunk` chains (padded), because matrix kernels are picked by batch size: so image i
depends only on (seed, i) and the chunk size, bit for bit, whatever the batch size or number of processes
(on one kind of device with one thread count).

- init "prior": ε ~ N(0, I); Langevin on U(ε) = E(T_t(ε)) + ½‖ε‖², T_t the decoder at temperature t
  (t scales every prior σ and the decoder σ).
- init "low-temp" (App. E; never implemented in the official code): draw x from the VAE at temperature
  t with the BN statistics readjusted for t (from the bundle; a t not in the bundle is refused),
  clamp it to [−1, 1], encode it with the ORIGINAL statistics into (ε_z, ε_x) at the bundle's sampling
  temperature (the one the energy was trained at, normally 1), and run Langevin from there at that
  temperature.
- BN statistics: Langevin always runs with the original statistics, the ones the energy was trained with
  (an energy trained on statistics readjusted at t, `vae.bn_temperature`, has them as its bundle's original
  and cached t statistics: README, "BN statistics of an energy"). VAE-only sampling (steps = 0, prior
  init) at a temperature the bundle has readjusted statistics for uses them, as NVAE's sampler does;
  otherwise the original ones.
- The returned image is the decoder mean μ_x(z) of the final ε; `to_uint8` maps it to [0, 255] by
  clamping to [−1, 1] (the official script min–max rescaled every image on its own instead).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from models.adapters import build_adapter
from models.langevin import PerChainNoise, chain_seed, langevin
from models.nvae.bn_stats import temperature_key
from models.nvae.model import NVAE

INITS = ("prior", "low-temp")
DEFAULT_CHUNK = 64  # chains per network evaluation when the bundle does not say (`sampling.chunk`)
LOW_TEMPERATURE = 0.7  # default temperature of the low-temperature initialization (App. E)
AUTOCAST = {"no": None, "bf16": torch.bfloat16}


class SamplingOptionError(ValueError):
    """Sampling options this bundle cannot honour (e.g. a temperature without readjusted BN statistics)."""


# ----------------------------------------------------------------------------------------------
# The sampler.


@dataclass
class SamplingOptions:
    """Resolved options of one sampling run (`BundleSampler.options`)."""

    steps: int
    step_size: float | None
    temperature: float  # prior init: the temperature of T_t; low-temp init: the VAE draw's temperature
    init: str
    chain_temperature: float  # the temperature Langevin (and the final decode) runs at
    autocast: str = "no"
    metropolis: bool = False  # Metropolis-adjusted Langevin (models/langevin.py)

    def as_dict(self) -> dict[str, Any]:
        """The options as a plain dict."""
        return dataclasses.asdict(self)


@dataclass
class SampleOutput:
    """One batch of chains (CPU tensors)."""

    indices: list[int]
    mean: torch.Tensor  # [B, *image_shape] decoder mean of the final ε, not clamped
    sample: torch.Tensor | None  # [B, *image_shape] the decoder sample x = μ + t·σ·ε_x that the energy scored
    frames: list[torch.Tensor] = field(default_factory=list)  # decoder means at frame_steps, each [B, ...]
    frame_steps: list[int] = field(default_factory=list)

    def head(self, count: int) -> "SampleOutput":
        """The first `count` chains."""
        return SampleOutput(self.indices[:count], self.mean[:count],
                            None if self.sample is None else self.sample[:count],
                            [frame[:count] for frame in self.frames], list(self.frame_steps))

    @staticmethod
    def concat(parts: list["SampleOutput"]) -> "SampleOutput":
        """The chains of `parts`, in order (all with the same frame steps)."""
        first = parts[0]
        sample = None if first.sample is None else torch.cat([p.sample for p in parts])
        frames = [torch.cat([p.frames[k] for p in parts]) for k in range(len(first.frames))]
        return SampleOutput([i for p in parts for i in p.indices], torch.cat([p.mean for p in parts]), sample,
                            frames, list(first.frame_steps))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] in [−1, 1] → uint8 [N, C, H, W] by clamping (no per-image min–max rescaling).

    The one conversion used for saved samples, bundles and TensorBoard grids alike.
    """
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def _to_model_range(x: torch.Tensor, is_image: bool) -> torch.Tensor:
    """Images given as uint8 or float in [0, 1] (the official VAEBM convention) → the models' [−1, 1];
    toy points [N, D] are taken as they are."""
    if not is_image:
        return x.float()
    return (x.float() / 255.0 if x.dtype == torch.uint8 else x.float()) * 2.0 - 1.0


class BundleSampler:
    """A loaded bundle: `sample`, `sample_indices`, `energy`, `log_density_unnormalized`, `decoder_mean`."""

    def __init__(self, vae, energy: torch.nn.Module | None, manifest: dict[str, Any], path: Path,
                 device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        self.energy_net = None if energy is None else energy.to(self.device).eval().requires_grad_(False)
        self.manifest = manifest
        self.path = Path(path)
        self.defaults = dict(manifest["sampling"])
        self.chunk = int(self.defaults.get("chunk", DEFAULT_CHUNK))  # see `sample_indices`; settable
        self.file_sha256: dict[str, str] = {}  # the loaded files' digests as bundle.json records them (load_bundle)

    # --- what the bundle holds ---------------------------------------------------------------

    @property
    def kind(self) -> str:
        """The bundle's kind, from its manifest."""
        return self.manifest["kind"]

    @property
    def method(self) -> str | None:
        """The energy method (vaebm, latent-tilting, joint-prior), None for a VAE-only bundle."""
        entry = self.manifest.get("energy")
        return None if not entry else entry.get("method", "vaebm")

    @property
    def is_image(self) -> bool:
        """True if the bundle's VAE generates images, False for 2-D toy points."""
        return len(self.vae.image_shape) == 3

    @property
    def temperatures(self) -> list[float]:
        """Temperatures with readjusted BN statistics ([] for models without BN)."""
        return self.vae.cached_temperatures() if isinstance(self.vae, NVAE) else []

    @property
    def noise_shapes(self) -> list[tuple[int, ...]]:
        """Per-sample shapes of the noise tensors [ε_z1, …, ε_zL, (ε_k,) ε_x]."""
        return [*self.vae.latent_shapes, self.vae.image_shape]

    def _has_statistics(self, temperature: float) -> bool:
        return isinstance(self.vae, NVAE) and temperature_key(temperature) in {
            temperature_key(t) for t in self.temperatures}

    @contextlib.contextmanager
    def _statistics(self, temperature: float | None):
        """BN statistics readjusted for `temperature` inside the block (None: the original ones)."""
        if temperature is None or not isinstance(self.vae, NVAE):
            yield
            return
        with self.vae.temperature_statistics(temperature):  # cached: never re-runs the readjustment
            yield

    # --- options -----------------------------------------------------------------------------

    def options(self, steps: int | None = None, step_size: float | None = None, temperature: float | None = None,
                init: str = "prior", autocast: str | None = None, metropolis: bool | None = None) -> SamplingOptions:
        """Fill in the bundle's defaults and check the options; SamplingOptionError when they cannot work."""
        steps = int(self.defaults.get("steps", 0) if steps is None else steps)
        if steps < 0:
            raise SamplingOptionError(f"steps must be >= 0, got {steps}")
        if steps > 0 and self.energy_net is None:
            raise SamplingOptionError("this bundle has no energy network (an NVAE-only export): use steps 0")
        step_size = self.defaults.get("step_size") if step_size is None else float(step_size)
        if steps > 0 and (step_size is None or not step_size > 0):
            raise SamplingOptionError(f"step size must be > 0, got {step_size}")
        if init not in INITS:
            raise SamplingOptionError(f"init must be one of {', '.join(INITS)}, got {init!r}")
        base_temperature = float(self.defaults.get("temperature", 1.0))
        if temperature is None:
            temperature = LOW_TEMPERATURE if init == "low-temp" else base_temperature
        temperature = float(temperature)
        if not temperature > 0:
            raise SamplingOptionError(f"temperature must be > 0, got {temperature}")
        if init == "low-temp" and isinstance(self.vae, NVAE) and not self._has_statistics(temperature):
            available = ", ".join(f"{t:g}" for t in self.temperatures) or "none"
            raise SamplingOptionError(
                f"temperature {temperature:g} has no readjusted BN statistics in this bundle (available: {available}); "
                f"re-export with --temperatures including it")
        autocast = self.defaults.get("autocast", "no") if autocast is None else autocast
        if autocast not in AUTOCAST:
            raise SamplingOptionError(f"autocast must be one of {', '.join(AUTOCAST)}, got {autocast!r}")
        chain_temperature = base_temperature if init == "low-temp" else temperature
        metropolis = bool(self.defaults.get("metropolis", False) if metropolis is None else metropolis)
        return SamplingOptions(steps, step_size, temperature, init, chain_temperature, autocast, metropolis)

    # --- sampling ----------------------------------------------------------------------------

    def sample_indices(self, indices: Sequence[int], seed: int, steps: int | None = None,
                       step_size: float | None = None, temperature: float | None = None, init: str = "prior",
                       chains_every: int = 0, autocast: str | None = None,
                       metropolis: bool | None = None) -> SampleOutput:
        """Chains `indices` of a run seeded `seed`; see the module docstring.

        The networks always run on exactly `self.chunk` chains (the last chunk is padded with copies of its last
        chain, which are dropped): matrix kernels are chosen by batch size, so this is what makes chain i depend
        only on (seed, i), bit for bit, however the indices are batched or split across processes.
        """
        opts = self.options(steps, step_size, temperature, init, autocast, metropolis)
        indices = [int(i) for i in indices]
        parts = []
        for start in range(0, len(indices), self.chunk):
            real = indices[start:start + self.chunk]
            padded = real + real[-1:] * (self.chunk - len(real))
            parts.append(self._sample_chunk(padded, int(seed), opts, chains_every).head(len(real)))
        if not parts:
            empty = torch.zeros((0, *self.vae.image_shape))
            return SampleOutput([], empty, empty.clone())
        return SampleOutput.concat(parts)

    def _sample_chunk(self, indices: list[int], seed: int, opts: SamplingOptions, chains_every: int) -> SampleOutput:
        """One chunk of chains (see `sample_indices`)."""
        noise_source = PerChainNoise([chain_seed(seed, i) for i in indices])
        vae, device = self.vae, self.device
        chain_t = opts.chain_temperature
        with torch.inference_mode(False), torch.no_grad():
            draw = noise_source.initial(self.noise_shapes, device)
            if opts.init == "low-temp":
                q_eps = noise_source.initial(vae.latent_shapes, device)
                with self._statistics(opts.temperature):
                    x0 = vae.decode(draw[:-1], draw[-1], opts.temperature).x_sample.clamp(-1, 1)
                eps_z, eps_x, _ = vae.posterior_noise(x0, q_eps, chain_t)  # original statistics
                noise = [*eps_z, eps_x]
            else:
                noise = draw

        # VAE-only sampling at a temperature with readjusted statistics uses them (as NVAE does).
        final_stats = chain_t if (opts.steps == 0 and opts.init == "prior" and self._has_statistics(chain_t)) else None
        frames: list[torch.Tensor] = []
        frame_steps: list[int] = []

        def record(t: int, eps_z: list[torch.Tensor]) -> None:
            with torch.no_grad(), self._statistics(final_stats):
                frames.append(vae.decode(eps_z, None, chain_t).x_mean.float().cpu())
            frame_steps.append(t)

        if opts.steps > 0:
            adapter = build_adapter(self.method, vae, self.energy_net, chain_t)
            moved = noise if adapter.moves_eps_x else noise[:-1]  # latent methods keep ε_x as drawn
            with torch.inference_mode(False), torch.enable_grad():
                result = langevin(moved, adapter, opts.steps, opts.step_size, noise_source,
                                  autocast_dtype=AUTOCAST[opts.autocast],
                                  callback=(lambda t, eps: record(t, adapter.latent_noise(eps))) if chains_every > 0 else None,
                                  callback_every=chains_every, metropolis=opts.metropolis)
            noise = result.noise if adapter.moves_eps_x else [*result.noise, noise[-1]]
        elif chains_every > 0:
            record(0, noise[:-1])
        with torch.inference_mode(False), torch.no_grad(), self._statistics(final_stats):
            generation = vae.decode(noise[:-1], noise[-1], chain_t)
        sample = None if generation.x_sample is None else generation.x_sample.float().cpu()
        return SampleOutput(indices, generation.x_mean.float().cpu(), sample, frames, frame_steps)

    def sample(self, n: int, steps: int | None = None, step_size: float | None = None,
               temperature: float | None = None, init: str = "prior", seed: int | None = None,
               generator: torch.Generator | None = None, batch_size: int = 64,
               autocast: str | None = None, metropolis: bool | None = None) -> torch.Tensor:
        """n samples: uint8 images [n, C, H, W] (decoder means, clamped) or, for 2-D toy bundles, the
        float points [n, D] (the decoder samples x = μ + t·σ·ε_x, what the energy scores).

        With `seed`, sample i is the same as image i of `scripts/sample.py --seed seed`. Without it a
        seed is drawn from `generator` (or torch's global RNG), so `torch.manual_seed` reproduces a call.
        """
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        outputs = []
        for start in range(0, n, batch_size):
            out = self.sample_indices(range(start, min(n, start + batch_size)), seed, steps, step_size,
                                      temperature, init, autocast=autocast, metropolis=metropolis)
            outputs.append(to_uint8(out.mean) if self.is_image else out.sample)
        if not outputs:
            return torch.zeros((0, *self.vae.image_shape), dtype=torch.uint8 if self.is_image else torch.float32)
        return torch.cat(outputs)

    # --- scoring -----------------------------------------------------------------------------

    @torch.no_grad()
    def energy(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """E_ψ(x) [N] (float, CPU) of images [N, C, H, W], uint8 or float in [0, 1] (the official VAEBM
        convention; `decoder_mean` output m maps there as (m + 1)/2). Toy bundles take points [N, D] as is.

        The networks themselves take [−1, 1] (README, Design: data range), so images are mapped there first; an imported
        official network maps back to the [0, 1] its weights expect (`EnergyNetConfig.input_range`).
        """
        self._require_data_energy()
        x = _to_model_range(images, self.is_image)
        return torch.cat([self.energy_net(chunk.to(self.device)).float().cpu() for chunk in x.split(batch_size)])

    @torch.no_grad()
    def log_density_unnormalized(self, x: torch.Tensor, num_samples: int = 16, seed: int = 0,
                                 batch_size: int = 64) -> torch.Tensor:
        """log h(x) = −E_ψ(x) + log p̂_vae(x), up to the VAEBM normalizing constant, [N] (float, CPU).

        x: images uint8 or float in [0, 1] (as `energy`), or toy points. log p̂_vae is the importance-weighted estimate (IWAE, Burda et al.) with `num_samples` posterior
        samples: log (1/K) Σ_k p(x|z_k) p(z_k) / q(z_k|x), a stochastic lower bound on log p_vae(x)
        (K = 1: the one-sample ELBO), at temperature 1 with the original BN statistics. p(x|z) is the
        decoder's Gaussian DENSITY of x in the model's [−1, 1] units (inputs are mapped there; NVAE inputs are
        quantized to num_x_bits first), without a discretization correction: compare scores of inputs
        of the same shape only (e.g. OOD AUROC). The posterior noise of x_j comes from chain_seed(seed, j),
        so a score does not depend on the batch. For NVAE-only bundles the energy term is 0.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if self.energy_net is not None:
            self._require_data_energy(pixel_space=True)
        x = _to_model_range(x, self.is_image)
        scores = []
        for start in range(0, x.shape[0], batch_size):
            chunk = x[start:start + batch_size].to(self.device)
            source = PerChainNoise([chain_seed(seed, j) for j in range(start, start + chunk.shape[0])])
            weights = []
            for _ in range(num_samples):
                q_eps = source.initial(self.vae.latent_shapes, self.device)
                weights.append(self.vae.posterior_noise(chunk, q_eps, 1.0)[2].float())
            log_p = torch.logsumexp(torch.stack(weights), dim=0) - math.log(num_samples)
            if self.energy_net is not None:
                log_p = log_p - self.energy_net(chunk).float()
            scores.append(log_p.cpu())
        return torch.cat(scores)

    def _require_data_energy(self, pixel_space: bool = False) -> None:
        """Refuse energy calls the bundle's method cannot answer (with a clear message)."""
        if self.energy_net is None:
            raise SamplingOptionError("this bundle has no energy network (an NVAE-only export)")
        if self.method == "joint-prior":
            raise SamplingOptionError("this bundle's energy scores latents (joint-prior), not images")
        if pixel_space and self.method != "vaebm":
            raise SamplingOptionError(f"log h(x) = log p_vae(x) − E(x) holds for VAEBM bundles; this one is {self.method}")

    @torch.no_grad()
    def decoder_mean(self, eps_z: Sequence[torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
        """μ_x(z(ε_z)) [N, C, H, W] (CPU) at `temperature` with the original BN statistics.

        eps_z: one noise tensor per `vae.latent_shapes` entry, each [N, *shape]: one per latent group,
        top (lowest-resolution) group first, then a VampPrior top group's component selector [N, 1].
        The mean is in the model's [−1, 1] units and, like the official decoder's, only soft-clamped:
        values slightly outside [−1, 1] occur (`to_uint8` clamps them for pixels).
        """
        eps_z = [e.to(self.device, torch.float32) for e in eps_z]
        return self.vae.decode(eps_z, None, temperature).x_mean.float().cpu()

    def __repr__(self) -> str:
        return (f"BundleSampler({str(self.path)!r}, kind={self.kind}, vae={self.manifest['vae']['type']}, "
                f"temperatures={self.temperatures}, defaults={self.defaults}, device={self.device})")
