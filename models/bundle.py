"""Self-contained inference bundles: write one (`save_bundle`), load it (`load_bundle`), sample from it.

A bundle is a directory written by `scripts/export.py` (atomically: a temporary directory renamed
into place):

    bundle.json            format name and version, kind (vae | vaebm), the VAE config (type nvae | mlp),
                           the energy-network config (VAEBM), the sampling defaults of the preset
                           (Langevin steps = langevin.sample_steps, step size, temperature), the
                           temperatures with readjusted BN statistics, the source run/step/checkpoints,
                           and the size and SHA-256 of every file; written last
    vae.safetensors        the VAE state dict (EMA or raw weights, as exported)
    energy.safetensors     the energy-network state dict (VAEBM bundles only)
    bn_stats.safetensors   NVAE only: BN running statistics readjusted at each exported temperature,
                           keys 't0.70/<module path>.running_mean' (`NVAE.bn_cache_state`)

Loading imports only torch, safetensors and einops (through `models`): never the trainer, Accelerate,
DeepSpeed, WebDataset, TensorBoard or torch-fidelity, and never unpickles. A missing file, a tensor
of the wrong shape, an unknown format version or a weights file that is not safetensors raises
`BundleError` naming the problem.

Sampling (`BundleSampler.sample_indices`; DESIGN §2, VAEBM App. E). Chain i's initial noise and
Langevin noise come from its own generator seeded `chain_seed(seed, i)`, so image i depends only on
(seed, i), whatever the batch size or number of processes (bit-exact on CPU in our tests; other
backends may pick batch-size-dependent kernels).

- init "prior": ε ~ N(0, I); Langevin on U(ε) = E(T_t(ε)) + ½‖ε‖², T_t the decoder at temperature t
  (t scales every prior σ and the decoder σ).
- init "low-temp" (App. E; never implemented in the official code): draw x from the VAE at temperature
  t with the BN statistics readjusted for t (from the bundle; a t not in the bundle is refused),
  clamp it to [−1, 1], encode it with the ORIGINAL statistics into (ε_z, ε_x) at the bundle's sampling
  temperature (the one the energy was trained at, normally 1), and run Langevin from there at that
  temperature.
- BN statistics: Langevin always runs with the original statistics (the model the energy was trained
  on). VAE-only sampling (steps = 0, prior init) at a temperature the bundle has readjusted statistics
  for uses them, as NVAE's sampler does; otherwise the original ones.
- The returned image is the decoder mean μ_x(z) of the final ε; `to_uint8` maps it to [0, 255] by
  clamping to [−1, 1] (the official script min–max rescaled every image on its own instead).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file

from models.energy import EnergyNetConfig, build_energy
from models.langevin import PerChainNoise, chain_seed, langevin
from models.mlp_vae import MLPVAE, MLPVAEConfig
from models.nvae.bn_stats import temperature_key
from models.nvae.config import NVAEConfig
from models.nvae.distributions import Normal
from models.nvae.model import NVAE

FORMAT = "vaebm-trainer-bundle"
FORMAT_VERSION = 1
MANIFEST = "bundle.json"
VAE_FILE, ENERGY_FILE, BN_FILE = "vae.safetensors", "energy.safetensors", "bn_stats.safetensors"
INITS = ("prior", "low-temp")
LOW_TEMPERATURE = 0.7  # default temperature of the low-temperature initialization (App. E)
AUTOCAST = {"no": None, "bf16": torch.bfloat16}


class BundleError(ValueError):
    """A bundle that cannot be loaded: missing file, wrong shapes, unknown version, not safetensors."""


class SamplingOptionError(ValueError):
    """Sampling options this bundle cannot honour (e.g. a temperature without readjusted BN statistics)."""


# ----------------------------------------------------------------------------------------------
# Writing.


def _clean(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors wants contiguous CPU tensors that share no storage."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}


def _file_digest(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def vae_type(vae) -> str:
    if isinstance(vae, NVAE):
        return "nvae"
    if isinstance(vae, MLPVAE):
        return "mlp"
    raise TypeError(f"cannot bundle a VAE of type {type(vae).__name__}")


def save_bundle(
    path: str | Path,
    vae,
    energy: torch.nn.Module | None = None,
    energy_config: EnergyNetConfig | None = None,
    *,
    sampling: dict[str, Any],
    source: dict[str, Any] | None = None,
    bn: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a bundle directory atomically (temporary directory, then rename); returns its path.

    `sampling`: defaults {steps, step_size, temperature, autocast}. The readjusted BN statistics are
    the VAE's per-temperature cache (`NVAE.bn_cache_state()`: fill it with `temperature_statistics`
    first); `bn` adds how they were computed (passes, batch size). `source`: provenance, any JSON.
    """
    path = Path(path)
    if (energy is None) != (energy_config is None):
        raise ValueError("pass both energy and energy_config, or neither")
    if path.exists() and not overwrite:
        raise BundleError(f"'{path}' already exists (pass overwrite / --overwrite to replace it)")
    kind = vae_type(vae)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.tmp-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        files = {VAE_FILE: vae.state_dict()}
        temperatures: list[float] = []
        if kind == "nvae":
            files[BN_FILE] = vae.bn_cache_state()
            temperatures = vae.cached_temperatures()
        if energy is not None:
            files[ENERGY_FILE] = energy.state_dict()
        umask = os.umask(0)
        os.umask(umask)
        for name, tensors in files.items():
            save_file(_clean(tensors), str(staging / name))
            os.chmod(staging / name, 0o666 & ~umask)  # safetensors creates files readable by the owner only
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": "vaebm" if energy is not None else "vae",
            "vae": {"type": kind, "config": dataclasses.asdict(vae.cfg), "file": VAE_FILE},
            "energy": None if energy is None else {"config": dataclasses.asdict(energy_config), "file": ENERGY_FILE},
            "bn": None if kind != "nvae" else {"file": BN_FILE, "temperatures": temperatures, **(bn or {})},
            "sampling": dict(sampling),
            "source": source or {},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "torch_version": torch.__version__,
            "files": {name: _file_digest(staging / name) for name in files},
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        if path.exists():  # overwrite: move the old bundle aside, put the new one in place, drop the old
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
            os.replace(staging, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


# ----------------------------------------------------------------------------------------------
# Reading.


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The bundle's `bundle.json`, checked for format name and version."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"bundle '{path}' does not exist or is not a directory")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"bundle '{path}' has no {MANIFEST} (missing file; not a bundle, or an unfinished export)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"'{manifest_path}' is not valid JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"'{manifest_path}' is not a {FORMAT} manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"bundle '{path}' has unknown format version {version!r}; this code reads version {FORMAT_VERSION}")
    for key in ("kind", "vae", "sampling"):
        if key not in manifest:
            raise BundleError(f"'{manifest_path}' has no '{key}' entry")
    return manifest


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file, or BundleError naming what is wrong with it. Never unpickles."""
    if path.suffix != ".safetensors":
        raise BundleError(f"weights file '{path}' is not a .safetensors file; bundles hold safetensors only")
    if not path.is_file():
        raise BundleError(f"bundle file '{path}' is missing")
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9 or head[8:9] != b"{":  # safetensors: 8-byte header length, then a JSON header
        pickle_like = head[:2] == b"PK" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))
        hint = " (it looks like a pickle / torch.save file; bundles are never unpickled)" if pickle_like else ""
        raise BundleError(f"'{path}' is not a safetensors file{hint}")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for a bad header or a truncated file
        raise BundleError(f"'{path}' is not a valid safetensors file: {err}") from None


def _check_state(label: str, path: Path, module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Same keys and shapes as `module.state_dict()`, or BundleError naming the first difference."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensor(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[:3]}")
        raise BundleError(f"'{path}' does not match the {label} described in {MANIFEST}: {'; '.join(parts)}")
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise BundleError(f"'{path}': tensor '{key}' has shape {list(value.shape)}, but the {label} described "
                              f"in {MANIFEST} expects {list(expected[key].shape)}")


def _build_config(cls, values: Any, where: str):
    if not isinstance(values, dict):
        raise BundleError(f"{where} must be a mapping, got {values!r}")
    try:
        cfg = cls(**values)
        if hasattr(cfg, "validate"):
            cfg.validate()
    except (TypeError, ValueError) as err:
        raise BundleError(f"{where} is not a valid {cls.__name__}: {err}") from None
    return cfg


def _check_bn(path: Path, vae: NVAE, stats: dict[str, torch.Tensor], listed: Sequence[float]) -> None:
    layers = dict(vae.bn_layers(generative_only=False))
    for flat_key, value in stats.items():
        key, _, name = flat_key.partition("/")
        module, _, stat = name.rpartition(".")
        if module not in layers or stat not in ("running_mean", "running_var") or not key.startswith("t"):
            raise BundleError(f"'{path}': '{flat_key}' is not a BN statistic of the VAE described in {MANIFEST}")
        expected = getattr(layers[module], stat).shape
        if tuple(value.shape) != tuple(expected):
            raise BundleError(f"'{path}': tensor '{flat_key}' has shape {list(value.shape)}, expected {list(expected)}")
    present = {flat_key.partition("/")[0] for flat_key in stats}
    wanted = {temperature_key(float(t)) for t in listed}
    if present != wanted:
        raise BundleError(f"'{path}' holds BN statistics for {sorted(present)}, but {MANIFEST} lists {sorted(wanted)}")


def load_bundle(path: str | Path, device: torch.device | str = "cpu") -> "BundleSampler":
    """Load a bundle onto `device`; returns a `BundleSampler` (networks in eval mode, frozen)."""
    path = Path(path)
    manifest = read_manifest(path)
    vae_entry = manifest["vae"]
    if not isinstance(vae_entry, dict) or vae_entry.get("type") not in ("nvae", "mlp"):
        raise BundleError(f"{MANIFEST}: vae.type must be 'nvae' or 'mlp'")
    config_cls = NVAEConfig if vae_entry["type"] == "nvae" else MLPVAEConfig
    vae_cfg = _build_config(config_cls, vae_entry.get("config"), f"{MANIFEST} vae.config")
    vae = NVAE(vae_cfg) if vae_entry["type"] == "nvae" else MLPVAE(vae_cfg)
    vae_path = path / str(vae_entry.get("file", VAE_FILE))
    state = _read_tensors(vae_path)
    _check_state("VAE", vae_path, vae, state)
    vae.load_state_dict(state)
    if vae_entry["type"] == "nvae":
        bn_entry = manifest.get("bn") or {}
        bn_path = path / str(bn_entry.get("file", BN_FILE))
        stats = _read_tensors(bn_path)
        _check_bn(bn_path, vae, stats, bn_entry.get("temperatures", []))
        vae.load_bn_cache_state(stats)

    energy = None
    energy_entry = manifest.get("energy")
    if manifest["kind"] == "vaebm":
        if not isinstance(energy_entry, dict):
            raise BundleError(f"{MANIFEST}: a vaebm bundle needs an 'energy' entry")
        energy_cfg = _build_config(EnergyNetConfig, energy_entry.get("config"), f"{MANIFEST} energy.config")
        try:
            energy = build_energy(energy_cfg)
        except ValueError as err:
            raise BundleError(f"{MANIFEST} energy.config: {err}") from None
        energy_path = path / str(energy_entry.get("file", ENERGY_FILE))
        state = _read_tensors(energy_path)
        _check_state("energy network", energy_path, energy, state)
        energy.load_state_dict(state)
    elif manifest["kind"] != "vae":
        raise BundleError(f"{MANIFEST}: kind must be 'vae' or 'vaebm', got {manifest['kind']!r}")
    return BundleSampler(vae, energy, manifest, path, device)


# ----------------------------------------------------------------------------------------------
# The posterior walk with given noise (low-temperature init, importance-weighted log-likelihood).


def _posterior_walk(vae, x: torch.Tensor, q_eps: list[torch.Tensor], temperature: float = 1.0):
    """(ε_z, ε_x, log p(x|z) + log p(z) − log q(z|x)) along z ~ q(z|x) drawn with the given noise.

    `NVAE.encode_noise` draws its posterior noise from one generator for the whole batch; here every
    chain brings its own (`q_eps`, one tensor per latent group), so the result of chain i does not
    depend on the batch. The ε's invert `decode` at `temperature`; the log-weight is at temperature 1.
    Uses NVAE's private pass helpers (`_encode`, `_posterior`, `_decoder`, …) exactly as
    `encode_noise` does.
    """
    if isinstance(vae, MLPVAE):
        mu_q, log_sigma_q = vae.encode(x)
        z = mu_q + torch.exp(log_sigma_q) * q_eps[0]
        eps_z, eps_x = vae.latents_to_noise([z], x, temperature)
        x_mean, x_log_sigma = vae.decode_params(z)
        half_log_2pi = 0.5 * math.log(2 * math.pi)
        log_px_z = (-0.5 * ((x - x_mean) * torch.exp(-x_log_sigma)) ** 2 - x_log_sigma - half_log_2pi).sum(-1)
        log_pz = (-0.5 * z * z - half_log_2pi).sum(-1)
        log_qz = (-0.5 * q_eps[0] * q_eps[0] - log_sigma_q - half_log_2pi).sum(-1)
        return eps_z, eps_x, log_px_z + log_pz - log_qz
    x = vae.quantize(x)
    top, features = vae._encode(x)
    eps_z: list[torch.Tensor] = []
    log_w = []

    def posterior_latent(g: int, state: torch.Tensor, prior_params: torch.Tensor | None) -> torch.Tensor:
        q = vae._posterior(g, state, prior_params, top, features)
        z0 = q.sample_given_eps(q_eps[g])
        z = vae._apply_flows(g, z0)
        eps_z.append(vae._prior(z, prior_params, temperature).eps_given_sample(z))
        # Volume-preserving flows: log q(z) = log q0(z0), as in NVAE.forward.
        log_w.append((vae._prior(z, prior_params).log_prob(z) - q.log_prob(z0)).sum(dim=(1, 2, 3)))
        return z

    _, out = vae._decoder(x.shape[0], posterior_latent)
    x_dist = Normal.from_params(out)
    eps_x = (x - x_dist.mu) / (temperature * x_dist.sigma)
    log_px_z = x_dist.log_prob(x).sum(dim=(1, 2, 3))
    return eps_z, eps_x, log_px_z + torch.stack(log_w).sum(0)


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

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SampleOutput:
    """One batch of chains (CPU tensors)."""

    indices: list[int]
    mean: torch.Tensor  # [B, *image_shape] decoder mean of the final ε, not clamped
    sample: torch.Tensor | None  # [B, *image_shape] the decoder sample x = μ + t·σ·ε_x that the energy scored
    frames: list[torch.Tensor] = field(default_factory=list)  # decoder means at frame_steps, each [B, ...]
    frame_steps: list[int] = field(default_factory=list)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] in [−1, 1] → uint8 by clamping (no per-image min–max rescaling)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def _as_float_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 images → [−1, 1]; floats are taken to be in [−1, 1] already."""
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1.0
    return x.float()


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

    # --- what the bundle holds ---------------------------------------------------------------

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def is_image(self) -> bool:
        return len(self.vae.image_shape) == 3

    @property
    def temperatures(self) -> list[float]:
        """Temperatures with readjusted BN statistics ([] for models without BN)."""
        return self.vae.cached_temperatures() if isinstance(self.vae, NVAE) else []

    @property
    def noise_shapes(self) -> list[tuple[int, ...]]:
        """Per-sample shapes of the noise tensors [ε_z1, …, ε_zL, ε_x]."""
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
                init: str = "prior", autocast: str | None = None) -> SamplingOptions:
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
        return SamplingOptions(steps, step_size, temperature, init, chain_temperature, autocast)

    # --- sampling ----------------------------------------------------------------------------

    def sample_indices(self, indices: Sequence[int], seed: int, steps: int | None = None,
                       step_size: float | None = None, temperature: float | None = None, init: str = "prior",
                       chains_every: int = 0, autocast: str | None = None) -> SampleOutput:
        """Chains `indices` of a run seeded `seed` (chain i depends only on (seed, i)); see the module doc."""
        opts = self.options(steps, step_size, temperature, init, autocast)
        indices = [int(i) for i in indices]
        noise_source = PerChainNoise([chain_seed(int(seed), i) for i in indices])
        vae, device = self.vae, self.device
        chain_t = opts.chain_temperature
        with torch.inference_mode(False), torch.no_grad():
            draw = noise_source.initial(self.noise_shapes, device)
            if opts.init == "low-temp":
                q_eps = noise_source.initial(vae.latent_shapes, device)
                with self._statistics(opts.temperature):
                    x0 = vae.decode(draw[:-1], draw[-1], opts.temperature).x_sample.clamp(-1, 1)
                eps_z, eps_x, _ = _posterior_walk(vae, x0, q_eps, chain_t)  # original statistics
                noise = [*eps_z, eps_x]
            else:
                noise = draw

        # VAE-only sampling at a temperature with readjusted statistics uses them (as NVAE does).
        final_stats = chain_t if (opts.steps == 0 and opts.init == "prior" and self._has_statistics(chain_t)) else None
        frames: list[torch.Tensor] = []
        frame_steps: list[int] = []

        def record(t: int, eps: list[torch.Tensor]) -> None:
            with torch.no_grad(), self._statistics(final_stats):
                frames.append(vae.decode(eps[:-1], None, chain_t).x_mean.float().cpu())
            frame_steps.append(t)

        if opts.steps > 0:
            energy_net = self.energy_net

            def energy_fn(eps: list[torch.Tensor]) -> torch.Tensor:
                return energy_net(vae.decode(eps[:-1], eps[-1], chain_t).x_sample)

            with torch.inference_mode(False), torch.enable_grad():
                result = langevin(noise, energy_fn, opts.steps, opts.step_size, noise_source,
                                  autocast_dtype=AUTOCAST[opts.autocast],
                                  callback=record if chains_every > 0 else None, callback_every=chains_every)
            noise = result.noise
        elif chains_every > 0:
            record(0, noise)
        with torch.inference_mode(False), torch.no_grad(), self._statistics(final_stats):
            generation = vae.decode(noise[:-1], noise[-1], chain_t)
        sample = None if generation.x_sample is None else generation.x_sample.float().cpu()
        return SampleOutput(indices, generation.x_mean.float().cpu(), sample, frames, frame_steps)

    def sample(self, n: int, steps: int | None = None, step_size: float | None = None,
               temperature: float | None = None, init: str = "prior", seed: int | None = None,
               generator: torch.Generator | None = None, batch_size: int = 64,
               autocast: str | None = None) -> torch.Tensor:
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
                                      temperature, init, autocast=autocast)
            outputs.append(to_uint8(out.mean) if self.is_image else out.sample)
        if not outputs:
            return torch.zeros((0, *self.vae.image_shape), dtype=torch.uint8 if self.is_image else torch.float32)
        return torch.cat(outputs)

    # --- scoring -----------------------------------------------------------------------------

    @torch.no_grad()
    def energy(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """E_ψ(x) [N] (float, CPU) for images uint8 [N, C, H, W] or float in [−1, 1] (or toy points [N, D])."""
        if self.energy_net is None:
            raise SamplingOptionError("this bundle has no energy network (an NVAE-only export)")
        x = _as_float_images(x)
        return torch.cat([self.energy_net(chunk.to(self.device)).float().cpu() for chunk in x.split(batch_size)])

    @torch.no_grad()
    def log_density_unnormalized(self, x: torch.Tensor, num_samples: int = 16, seed: int = 0,
                                 batch_size: int = 64) -> torch.Tensor:
        """log h(x) = −E_ψ(x) + log p̂_vae(x), up to the VAEBM normalizing constant, [N] (float, CPU).

        log p̂_vae is the importance-weighted estimate (IWAE, Burda et al.) with `num_samples` posterior
        samples: log (1/K) Σ_k p(x|z_k) p(z_k) / q(z_k|x), a stochastic lower bound on log p_vae(x)
        (K = 1: the one-sample ELBO), at temperature 1 with the original BN statistics. p(x|z) is the
        decoder's Gaussian DENSITY of x in [−1, 1] units (uint8 input is mapped there; NVAE inputs are
        quantized to num_x_bits first), without a discretization correction: compare scores of inputs
        of the same shape only (e.g. OOD AUROC). The posterior noise of x_j comes from chain_seed(seed, j),
        so a score does not depend on the batch. For NVAE-only bundles the energy term is 0.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        x = _as_float_images(x)
        scores = []
        for start in range(0, x.shape[0], batch_size):
            chunk = x[start:start + batch_size].to(self.device)
            source = PerChainNoise([chain_seed(seed, j) for j in range(start, start + chunk.shape[0])])
            weights = []
            for _ in range(num_samples):
                q_eps = source.initial(self.vae.latent_shapes, self.device)
                weights.append(_posterior_walk(self.vae, chunk, q_eps, 1.0)[2].float())
            log_p = torch.logsumexp(torch.stack(weights), dim=0) - math.log(num_samples)
            if self.energy_net is not None:
                log_p = log_p - self.energy_net(chunk).float()
            scores.append(log_p.cpu())
        return torch.cat(scores)

    @torch.no_grad()
    def decoder_mean(self, eps_z: Sequence[torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
        """μ_x(z(ε_z)) at `temperature` with the original BN statistics, clamped to [−1, 1]: [N, C, H, W] (CPU)."""
        eps_z = [e.to(self.device, torch.float32) for e in eps_z]
        return self.vae.decode(eps_z, None, temperature).x_mean.float().clamp(-1, 1).cpu()

    def __repr__(self) -> str:
        return (f"BundleSampler({str(self.path)!r}, kind={self.kind}, vae={self.manifest['vae']['type']}, "
                f"temperatures={self.temperatures}, defaults={self.defaults}, device={self.device})")
