"""Self-contained inference bundles: the file format. Write one (`save_bundle`), load it (`load_bundle`).

A bundle is a directory written by `scripts/export.py` (atomically: a temporary directory renamed
into place):

    bundle.json            format name and version, kind (vae | vaebm), the VAE config (type nvae | mlp | hvae),
                           the energy-network config (VAEBM), the sampling defaults of the preset
                           (Langevin steps = langevin.sample_steps, step size, temperature), the
                           temperatures with readjusted BN statistics, the source run/step/checkpoints,
                           and the size and SHA-256 of every file; written last
    vae.safetensors        the VAE state dict (EMA or raw weights, as exported)
    energy.safetensors     the energy-network state dict (VAEBM bundles only)
    bn_stats.safetensors   NVAE only: BN running statistics readjusted at each exported temperature,
                           keys 't0.70/<module path>.running_mean' (`NVAE.bn_cache_state`). An energy
                           trained on readjusted statistics has them as the VAE's own (in vae.safetensors)
                           and as its temperature's entry; `bn.energy_statistics` in bundle.json records it

Loading imports only torch, safetensors and einops (through `models`): never the trainer, Accelerate,
DeepSpeed, WebDataset, TensorBoard or torch-fidelity, and never unpickles. Nothing outside the bundle is
read and nothing unverified is trusted, in this order: every file `bundle.json` names must resolve inside the
bundle folder (no absolute path, no `..`, no symlink leading out); the networks are built on the meta device
(no memory) and the tensor names and shapes in each file's safetensors header are checked against them; each
file's size and SHA-256 must match `bundle.json` (`verify=False` skips the SHA-256, for trusted bundles too
large to read twice); only then are the networks built at full size and the weights loaded. Any failure
(a missing file, a tensor of the wrong shape, a changed file, an unknown format version, a weights file that
is not safetensors, a config the code cannot build) raises a one-line `BundleError` naming the problem.

Sampling from a loaded bundle lives in `models/sampler.py`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models.energy import EnergyNetConfig, build_energy
from models.files import file_digest
from models.hvae import HVAE, HVAEConfig
from models.mlp_vae import MLPVAE, MLPVAEConfig
from models.nvae.bn_stats import temperature_key
from models.nvae.config import NVAEConfig
from models.nvae.model import NVAE
from models.sampler import BundleSampler, SamplingOptionError  # noqa: F401 (SamplingOptionError re-exported)

FORMAT = "vaebm-trainer-bundle"
FORMAT_VERSION = 1
MANIFEST = "bundle.json"
VAE_FILE, ENERGY_FILE, BN_FILE = "vae.safetensors", "energy.safetensors", "bn_stats.safetensors"


class BundleError(ValueError):
    """A bundle that cannot be loaded: missing file, wrong shapes, unknown version, not safetensors, a file that
    changed or lies outside the bundle. Its message is one line, however long the values it quotes."""

    def __init__(self, message: str):
        line = " ".join(str(message).split())
        super().__init__(line if len(line) <= 600 else line[:599] + "…")


# ----------------------------------------------------------------------------------------------
# Writing.


def _clean(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors wants contiguous CPU tensors that share no storage."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}


def _file_digest(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": file_digest(path)}


def vae_type(vae) -> str:
    """The bundle's name for a VAE's type (nvae, mlp, hvae); TypeError for anything else."""
    if isinstance(vae, NVAE):
        return "nvae"
    if isinstance(vae, MLPVAE):
        return "mlp"
    if isinstance(vae, HVAE):
        return "hvae"
    raise TypeError(f"cannot bundle a VAE of type {type(vae).__name__}")


def save_bundle(
    path: str | Path,
    vae,
    energy: torch.nn.Module | None = None,
    energy_config: EnergyNetConfig | None = None,
    *,
    method: str = "vaebm",
    sampling: dict[str, Any],
    source: dict[str, Any] | None = None,
    bn: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a bundle directory atomically (temporary directory, then rename); returns its path.

    `method`: the energy method (`models/adapters.py`: vaebm, latent-tilting, joint-prior).
    `sampling`: defaults {steps, step_size, temperature, autocast, metropolis}. The readjusted BN statistics are
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
            "energy": None if energy is None else {"config": dataclasses.asdict(energy_config), "file": ENERGY_FILE,
                                                   "method": method},
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


def bundle_file(root: Path, name: Any, listed: dict[str, dict], verify: bool) -> Path:
    """The file `name` of bundle `root`, confined to the folder and matching its entry in bundle.json's `files`
    (size always; SHA-256 when `verify`). The SHA-256 is checked after the header (`header_shapes`) and before
    the data is loaded."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts \
            or "\\" in name:
        raise BundleError(f"{MANIFEST} names the file {str(name)[:80]!r}, which is not a plain name inside the bundle")
    path = root / name
    if not path.is_file():
        raise BundleError(f"bundle file '{path}' is missing")
    if not path.resolve().is_relative_to(root.resolve()):
        raise BundleError(f"bundle file '{path}' leads outside the bundle (to '{path.resolve()}')")
    if verify and name not in listed:
        raise BundleError(f"{MANIFEST} records no size and SHA-256 for '{name}'; cannot verify it "
                          f"(load with verify=False / sample.py --no-verify only if you trust this bundle)")
    return path


def check_file(path: Path, entry: dict | None, verify: bool) -> None:
    """Size and (with `verify`) SHA-256 of a bundle file against its bundle.json entry; streamed."""
    if entry is None:
        return
    if path.stat().st_size != entry["bytes"]:
        raise BundleError(f"bundle file '{path}' has {path.stat().st_size} bytes, but {MANIFEST} records "
                          f"{entry['bytes']} (truncated or replaced)")
    if verify and file_digest(path) != entry["sha256"]:
        raise BundleError(f"bundle file '{path}' does not match its SHA-256 in {MANIFEST} (changed or replaced)")


def _listed_files(manifest: dict, manifest_path: Path) -> dict[str, dict]:
    """bundle.json's `files`: {name: {"bytes": int, "sha256": hex}}, validated."""
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise BundleError(f"'{manifest_path}': 'files' must map file names to their bytes and sha256")
    for name, entry in files.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int)
                and isinstance(entry.get("sha256"), str)):
            raise BundleError(f"'{manifest_path}': the 'files' entry of {str(name)[:80]!r} needs bytes and sha256")
    return files


def _safetensors_header(path: Path) -> None:
    """Refuse a file that is not safetensors (e.g. a pickle renamed) before anything parses it."""
    if path.suffix != ".safetensors":
        raise BundleError(f"weights file '{path}' is not a .safetensors file; bundles hold safetensors only")
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9 or head[8:9] != b"{":  # safetensors: 8-byte header length, then a JSON header
        pickle_like = head[:2] == b"PK" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))
        hint = " (it looks like a pickle / torch.save file; bundles are never unpickled)" if pickle_like else ""
        raise BundleError(f"'{path}' is not a safetensors file{hint}")


def header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a safetensors file, read from its header only (no tensor data)."""
    _safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for a bad header or a truncated file
        raise BundleError(f"'{path}' is not a valid safetensors file: {err}") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file, or BundleError naming what is wrong with it. Never unpickles."""
    _safetensors_header(path)
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for a bad header or a truncated file
        raise BundleError(f"'{path}' is not a valid safetensors file: {err}") from None


def _check_state(label: str, path: Path, module: torch.nn.Module, shapes: dict[str, tuple[int, ...]]) -> None:
    """Same names and shapes as `module.state_dict()` (a meta-device module will do), or BundleError naming
    the first difference."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensor(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[:3]}")
        raise BundleError(f"'{path}' does not match the {label} described in {MANIFEST}: {'; '.join(parts)}")
    for key, shape in shapes.items():
        if tuple(shape) != tuple(expected[key].shape):
            raise BundleError(f"'{path}': tensor '{key}' has shape {list(shape)}, but the {label} described "
                              f"in {MANIFEST} expects {list(expected[key].shape)}")


def _on_meta(build, where: str):
    """`build()` on the meta device: the network's structure and shapes, no memory for its weights."""
    try:
        with torch.device("meta"):
            return build()
    except (TypeError, ValueError, RuntimeError, IndexError, KeyError, ZeroDivisionError, AssertionError) as err:
        raise BundleError(f"{MANIFEST} {where} cannot be built: {type(err).__name__}: {err}") from None


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


def _check_bn(path: Path, vae: NVAE, shapes: dict[str, tuple[int, ...]], listed: Any) -> None:
    if not isinstance(listed, list) or not all(isinstance(t, (int, float)) for t in listed):
        raise BundleError(f"{MANIFEST}: bn.temperatures must be a list of numbers")
    layers = dict(vae.bn_layers(generative_only=False))
    for flat_key, shape in shapes.items():
        key, _, name = flat_key.partition("/")
        module, _, stat = name.rpartition(".")
        if module not in layers or stat not in ("running_mean", "running_var") or not key.startswith("t"):
            raise BundleError(f"'{path}': '{flat_key}' is not a BN statistic of the VAE described in {MANIFEST}")
        expected = getattr(layers[module], stat).shape
        if tuple(shape) != tuple(expected):
            raise BundleError(f"'{path}': tensor '{flat_key}' has shape {list(shape)}, expected {list(expected)}")
    present = {flat_key.partition("/")[0] for flat_key in shapes}
    wanted = {temperature_key(float(t)) for t in listed}
    if present != wanted:
        raise BundleError(f"'{path}' holds BN statistics for {sorted(present)}, but {MANIFEST} lists {sorted(wanted)}")


def load_bundle(path: str | Path, device: torch.device | str = "cpu", *, verify: bool = True) -> "BundleSampler":
    """Load a bundle onto `device`; returns a `BundleSampler` (networks in eval mode, frozen).

    Checks everything first (module docstring): confinement, header names and shapes against the networks built
    on the meta device, sizes and SHA-256 digests (`verify=False` skips the digests: for trusted bundles only).
    The sampler's `file_sha256` holds the digests of the files it loaded, as bundle.json records them.
    """
    path = Path(path)
    manifest = read_manifest(path)
    listed = _listed_files(manifest, path / MANIFEST)
    vae_entry = manifest["vae"]
    vae_classes = {"nvae": (NVAEConfig, NVAE), "mlp": (MLPVAEConfig, MLPVAE), "hvae": (HVAEConfig, HVAE)}
    if not isinstance(vae_entry, dict) or vae_entry.get("type") not in vae_classes:
        raise BundleError(f"{MANIFEST}: vae.type must be one of {', '.join(vae_classes)}")
    if manifest["kind"] not in ("vae", "vaebm"):
        raise BundleError(f"{MANIFEST}: kind must be 'vae' or 'vaebm', got {str(manifest['kind'])[:40]!r}")
    config_cls, vae_cls = vae_classes[vae_entry["type"]]
    vae_cfg = _build_config(config_cls, vae_entry.get("config"), f"{MANIFEST} vae.config")

    # 1. Names and shapes against the networks built on the meta device, then sizes and digests.
    files: dict[str, Path] = {}  # name in the bundle -> its path, checked
    vae_meta = _on_meta(lambda: vae_cls(vae_cfg), "vae.config")
    vae_name = vae_entry.get("file", VAE_FILE)
    files[vae_name] = bundle_file(path, vae_name, listed, verify)
    _check_state("VAE", files[vae_name], vae_meta, header_shapes(files[vae_name]))
    bn_name = None
    if vae_entry["type"] == "nvae":
        bn_entry = manifest.get("bn") if isinstance(manifest.get("bn"), dict) else {}
        bn_name = bn_entry.get("file", BN_FILE)
        files[bn_name] = bundle_file(path, bn_name, listed, verify)
        _check_bn(files[bn_name], vae_meta, header_shapes(files[bn_name]), bn_entry.get("temperatures", []))
    energy_entry, energy_cfg, energy_name = manifest.get("energy"), None, None
    if manifest["kind"] == "vaebm":
        if not isinstance(energy_entry, dict):
            raise BundleError(f"{MANIFEST}: a vaebm bundle needs an 'energy' entry")
        energy_cfg = _build_config(EnergyNetConfig, energy_entry.get("config"), f"{MANIFEST} energy.config")
        energy_meta = _on_meta(lambda: build_energy(energy_cfg, vae_meta.z_shapes), "energy.config")
        energy_name = energy_entry.get("file", ENERGY_FILE)
        files[energy_name] = bundle_file(path, energy_name, listed, verify)
        _check_state("energy network", files[energy_name], energy_meta, header_shapes(files[energy_name]))
    for name, file in files.items():
        check_file(file, listed.get(name), verify)

    # 2. Everything checked: the networks at full size, the weights loaded.
    vae = vae_cls(vae_cfg)
    vae.load_state_dict(_read_tensors(files[vae_name]))
    if bn_name is not None:
        vae.load_bn_cache_state(_read_tensors(files[bn_name]))
    energy = None
    if energy_cfg is not None:
        energy = build_energy(energy_cfg, vae.z_shapes)
        energy.load_state_dict(_read_tensors(files[energy_name]))
    sampler = BundleSampler(vae, energy, manifest, path, device)
    sampler.file_sha256 = {name: listed[name]["sha256"] for name in files if name in listed}
    return sampler
