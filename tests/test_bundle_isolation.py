"""Bundles load with torch + safetensors only, never unpickle, and name what is wrong with a bad one."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file, save_file

from models.bundle import BundleError, load_bundle, save_bundle
from models.energy import EnergyNetConfig, build_energy
from models.nvae import NVAE, NVAEConfig
from trainer.cli import run_cli

TRAINING_STACK = ("accelerate", "deepspeed", "webdataset", "tensorboard", "torch_fidelity", "trainer", "yaml", "transformers")


def tiny_bundle(path):
    """An untrained 16×16 NVAE + conv energy, BN statistics readjusted at 0.7 (enough to test loading)."""
    torch.manual_seed(0)
    vae = NVAE(NVAEConfig(image_size=16, in_channels=3, channels_enc=8, channels_dec=8, num_latent_scales=2,
                          groups_per_scale=1, latents_per_group=4, cells_per_cond_enc=1, cells_per_cond_dec=1))
    with vae.temperature_statistics(0.7, passes=1, batch_size=2):
        pass
    cfg = EnergyNetConfig(kind="conv", layout="digits16", base_channels=8, in_channels=3)
    return save_bundle(path, vae, build_energy(cfg), cfg,
                       sampling={"steps": 2, "step_size": 1e-3, "temperature": 1.0, "autocast": "no"})


@pytest.fixture
def bundle(tmp_path):
    return tiny_bundle(tmp_path / "bundle")


def test_loading_and_sampling_import_no_training_stack(bundle):
    code = f"""
import json, sys
import models
light = "torch" not in sys.modules
sampler = models.load_bundle({str(bundle)!r})
images = sampler.sample(2, init="low-temp", temperature=0.7, seed=0)
sampler.energy(images)
sampler.log_density_unnormalized(images, num_samples=1)
print(json.dumps({{"light": light, "shape": list(images.shape), "modules": sorted(sys.modules)}}))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["light"], "`import models` must not import torch"
    assert report["shape"] == [2, 3, 16, 16]
    assert "models.bundle" in report["modules"] and "safetensors" in report["modules"]  # the check sees imports
    # torch itself imports the launcher's exit-code hook (a `torch.backends` entry point, standard library only,
    # inert outside a launcher) and its packages, whose __init__ files hold docstrings only.
    torch_plugin = {"trainer", "trainer.run", "trainer.run.launcher_exit"}
    loaded = [m for m in report["modules"] if m.split(".")[0] in TRAINING_STACK and m not in torch_plugin]
    assert loaded == []


def test_a_good_bundle_round_trips(bundle):
    sampler = load_bundle(bundle)
    assert sampler.temperatures == [0.7] and sampler.kind == "vaebm"
    state = load_file(bundle / "vae.safetensors")
    assert all(torch.equal(state[k], v) for k, v in sampler.vae.state_dict().items())


def _load(path):
    """A private copy of a safetensors file's tensors (load_file maps the file; it is rewritten below)."""
    return {k: v.clone() for k, v in load_file(path).items()}


def _missing_file(bundle):
    (bundle / "energy.safetensors").unlink()


def _wrong_shape(bundle):
    state = _load(bundle / "energy.safetensors")
    state["conv1.weight"] = state["conv1.weight"][:, :1].contiguous()  # the stem: 3 input channels → 1
    save_file(state, str(bundle / "energy.safetensors"))


def _missing_tensor(bundle):
    state = _load(bundle / "vae.safetensors")
    del state["prior_ftr0"]
    save_file(state, str(bundle / "vae.safetensors"))


def _unknown_version(bundle):
    manifest = json.loads((bundle / "bundle.json").read_text())
    manifest["format_version"] = 99
    (bundle / "bundle.json").write_text(json.dumps(manifest))


def _pickle_renamed(bundle):
    torch.save(_load(bundle / "vae.safetensors"), bundle / "vae.safetensors")


def _bad_bn_statistics(bundle):
    stats = _load(bundle / "bn_stats.safetensors")
    key = next(iter(stats))
    stats[key] = torch.zeros(stats[key].numel() + 1)
    save_file(stats, str(bundle / "bn_stats.safetensors"))


def _no_manifest(bundle):
    (bundle / "bundle.json").unlink()


@pytest.mark.parametrize("damage, message", [
    (_missing_file, r"energy\.safetensors' is missing"),
    (_wrong_shape, r"tensor 'conv1\.weight' has shape \[8, 1, 3, 3\].*expects \[8, 3, 3, 3\]"),
    (_missing_tensor, r"1 missing tensor\(s\), e\.g\. \['prior_ftr0'\]"),
    (_unknown_version, r"unknown format version 99"),
    (_pickle_renamed, r"vae\.safetensors' is not a safetensors file \(it looks like a pickle"),
    (_bad_bn_statistics, r"bn_stats\.safetensors': tensor 't0\.70/.*' has shape"),
    (_no_manifest, r"has no bundle\.json"),
])
def test_bad_bundles_name_the_problem(bundle, damage, message):
    damage(bundle)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle)


def test_pickled_weights_are_never_unpickled(bundle, monkeypatch):
    _pickle_renamed(bundle)
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("the loader unpickled a file")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(BundleError):
        load_bundle(bundle)


def test_sample_script_reports_a_bad_bundle_in_one_line(bundle, tmp_path, capsys):
    _unknown_version(bundle)
    spec = importlib.util.spec_from_file_location("script_sample", ROOT / "scripts" / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: module.main([str(bundle), "--n", "2", "--out", str(tmp_path / "out")]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "unknown format version 99" in err and len(err.splitlines()) == 1


# ---- Nothing let in: confinement, digests, sizes checked before anything is built (issue: bundles) -----------

def _manifest(bundle):
    return json.loads((bundle / "bundle.json").read_text())


def _write_manifest(bundle, manifest):
    (bundle / "bundle.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_bundle_files_must_stay_inside_the_folder(bundle, tmp_path, how):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    outside = elsewhere / "vae.safetensors"
    os.replace(bundle / "vae.safetensors", outside)
    manifest = _manifest(bundle)
    if how == "symlink":
        (bundle / "vae.safetensors").symlink_to(outside)
    else:
        name = "../elsewhere/vae.safetensors" if how == "dotdot" else str(outside)
        manifest["vae"]["file"] = name
        manifest["files"][name] = manifest["files"].pop("vae.safetensors")
        _write_manifest(bundle, manifest)
    with pytest.raises(BundleError, match="not a plain name inside the bundle|leads outside the bundle"):
        load_bundle(bundle)


def _flip_data_bytes(path, count=64):
    """Change `count` bytes of tensor data (after the header), leaving the header valid."""
    raw = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little") + 16
    raw[start:start + count] = bytes(255 - b for b in raw[start:start + count])
    path.write_bytes(bytes(raw))


def test_changed_weights_are_refused_unless_verification_is_off(bundle):
    _flip_data_bytes(bundle / "vae.safetensors")
    with pytest.raises(BundleError, match=r"vae\.safetensors' does not match its SHA-256"):
        load_bundle(bundle)
    assert load_bundle(bundle, verify=False).kind == "vaebm"  # the documented opt-out: sizes only


def test_a_truncated_file_is_refused_even_without_verification(bundle):
    path = bundle / "energy.safetensors"
    path.write_bytes(path.read_bytes()[:-16])
    with pytest.raises(BundleError, match="energy.safetensors' is not a valid safetensors file"):
        load_bundle(bundle, verify=False)


def test_an_absurd_config_is_refused_before_anything_is_allocated(bundle):
    """65,536 encoder channels would need ~150 GB of weights: the meta-device build and the header check refuse
    it while the process stays small (measured in a fresh process)."""
    manifest = _manifest(bundle)
    manifest["vae"]["config"]["channels_enc"] = 65536
    _write_manifest(bundle, manifest)
    code = f"""
import json, resource
from models.bundle import BundleError, load_bundle
try:
    load_bundle({str(bundle)!r})
    outcome = "loaded"
except BundleError as err:
    outcome = str(err)
print(json.dumps({{"outcome": outcome, "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]  # (on a loader that builds first: a C++ bad_alloc abort)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "does not match the VAE described in bundle.json" in report["outcome"] and "\n" not in report["outcome"]
    assert report["max_rss_mb"] < 1500, report


def test_sampling_refuses_weights_replaced_in_place(bundle, tmp_path, capsys):
    """Re-running sample.py into the same folder after the weights changed must not mix two models' images."""
    spec = importlib.util.spec_from_file_location("script_sample_guard", ROOT / "scripts" / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "out"
    args = [str(bundle), "--n", "2", "--out", str(out), "--steps", "1", "--chunk", "2"]
    module.main(args)
    assert json.loads((out / "sampling.json").read_text())["weights_sha256"]["vae.safetensors"] == \
        _manifest(bundle)["files"]["vae.safetensors"]["sha256"]
    other = tiny_bundle(tmp_path / "other")  # the same architecture, other weights (another init seed below)
    torch.manual_seed(1)
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in load_file(other / "vae.safetensors").items()}
    save_file(state, str(bundle / "vae.safetensors"))  # replaced in place; bundle.json unchanged
    (out / "000001.png").unlink()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: module.main(args))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert "vae.safetensors' does not match its SHA-256" in err
    assert not (out / "000001.png").exists()
