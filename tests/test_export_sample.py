"""Export a trained digits VAEBM run to a bundle and sample from it (scripts/export.py, scripts/sample.py).

The scripts' `main` runs in this process where a subprocess would only add interpreter start-up; the
two-process launch runs as a real `accelerate launch`.
"""
import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import FAST, ROOT, free_port, run_script
from PIL import Image
from safetensors.torch import load_file

from models.bundle import load_bundle, save_bundle
from models.energy import EnergyNetConfig, build_energy
from models.langevin import PerChainNoise, chain_seed
from models.mlp_vae import MLPVAE, MLPVAEConfig
from models.sampler import to_uint8
from trainer.config.loader import PRESET_DIR, read_yaml
from trainer.ebm.sources import load_frozen_vae
from trainer.errors import UserError
from trainer.run.checkpoint import latest_checkpoint

TWO_PROCESSES = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no",
                 "--main_process_port", str(free_port())]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


export_main, sample_main = _script("export"), _script("sample")


def pngs(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.png"))}


@pytest.fixture(scope="module")
def vaebm_run(nvae_run, cache_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("vaebm") / "run"
    run_script("train_vaebm.py", "--config", "digits", "--vae", str(nvae_run), "--run-dir", str(run_dir),
               f"data.cache_dir={cache_dir}", *FAST, "train.max_steps=1", "langevin.steps=1",
               "langevin.sample_steps=4", "train.image_every=0", "data_init_batches=1")
    return run_dir


@pytest.fixture(scope="module")
def bundle(vaebm_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "digits"
    export_main([str(vaebm_run), "--out", str(out), "--bn-passes", "2", "--temperatures", "0.7,1.0"])
    return out


@pytest.fixture(scope="module")
def reference(bundle, tmp_path_factory):
    """16 images, 4 Langevin steps, seed 0, one process, one batch of 16."""
    out = tmp_path_factory.mktemp("samples") / "ref"
    sample_main([str(bundle), "--n", "16", "--out", str(out), "--steps", "4", "--seed", "0", "--batch-size", "16"])
    return out


def test_export_writes_configs_weights_statistics_and_provenance(bundle, vaebm_run, nvae_run):
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["format_version"] == 1 and manifest["kind"] == "vaebm"
    preset_step_size = read_yaml(PRESET_DIR / "vaebm" / "digits.yaml")["langevin"]["step_size"]
    assert manifest["sampling"]["steps"] == 4 and manifest["sampling"]["step_size"] == pytest.approx(float(preset_step_size))
    assert manifest["bn"]["temperatures"] == [0.7, 1.0] and manifest["bn"]["passes"] == 2
    vae_checkpoint = latest_checkpoint(nvae_run)
    assert manifest["source"]["vae_checkpoint"] == str(vae_checkpoint.resolve())
    assert manifest["source"]["step"] == 1 and manifest["source"]["vae_weights"] == "ema"
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".")]  # no staging left behind
    # Weights are the checkpoints' tensors, unchanged.
    ema, vae = load_file(vae_checkpoint / "ema.safetensors"), load_file(bundle / "vae.safetensors")
    assert ema.keys() == vae.keys() and all(torch.equal(ema[k], vae[k]) for k in ema)
    energy = load_file(latest_checkpoint(vaebm_run) / "energy.safetensors")
    assert all(torch.equal(energy[k], t) for k, t in load_file(bundle / "energy.safetensors").items())
    # The statistics are those of the readjustment (VAEBM App. E) at each temperature, in order, with the recorded
    # seed and passes: redone here from the checkpoint's EMA weights, they agree bit for bit.
    stats = load_file(bundle / "bn_stats.safetensors")
    model = load_frozen_vae(nvae_run, "ema", "cpu")[0]
    generator = torch.Generator().manual_seed(manifest["bn"]["seed"])
    for t in (0.7, 1.0):
        with model.temperature_statistics(t, passes=manifest["bn"]["passes"], batch_size=manifest["bn"]["batch_size"],
                                          generator=generator):
            redone = model.bn_statistics()
        assert {f"t{t:.2f}/{k}" for k in redone} == {k for k in stats if k.startswith(f"t{t:.2f}/")}
        assert all(torch.equal(stats[f"t{t:.2f}/{k}"], v) for k, v in redone.items())
    assert not torch.equal(stats[f"t0.70/{next(iter(redone))}"], vae[next(iter(redone))])  # they moved
    with pytest.raises(UserError, match="already exists"):
        export_main([str(vaebm_run), "--out", str(bundle), "--bn-passes", "1"])


def test_batch_size_invariance_resume_and_settings_guard(bundle, reference, tmp_path, capsys):
    ref = pngs(reference)
    assert sorted(ref) == [f"{i:06d}.png" for i in range(16)]
    assert len(set(ref.values())) == 16  # 16 different images
    out = tmp_path / "b4"
    sample_main([str(bundle), "--n", "16", "--out", str(out), "--steps", "4", "--seed", "0", "--batch-size", "4"])
    assert pngs(out) == ref  # byte-identical whatever the batch size

    # Resume: only the missing files are made; the others are not rewritten.
    for name in ("000003.png", "000010.png", "000015.png"):
        (out / name).unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    capsys.readouterr()
    sample_main([str(bundle), "--n", "16", "--out", str(out), "--steps", "4", "--seed", "0", "--batch-size", "4"])
    assert "wrote 3 sample(s), skipped 13" in capsys.readouterr().err
    assert pngs(out) == ref
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept
    with pytest.raises(UserError, match="other settings"):
        sample_main([str(bundle), "--n", "16", "--out", str(out), "--steps", "2", "--seed", "0"])



@pytest.mark.slow
def test_two_processes_write_the_same_files(bundle, reference, tmp_path):
    out = tmp_path / "two"
    result = run_script("sample.py", str(bundle), "--n", "16", "--out", str(out), "--steps", "4", "--seed", "0",
                        "--batch-size", "16", launcher=TWO_PROCESSES)
    assert "rank 0/2: wrote 8" in result.stderr and "rank 1/2: wrote 8" in result.stderr
    assert pngs(out) == pngs(reference)


def test_low_temperature_initialization(bundle, tmp_path, capsys):
    out = tmp_path / "low"
    sample_main([str(bundle), "--n", "16", "--out", str(out), "--steps", "4", "--init", "low-temp",
                 "--temperature", "0.7", "--chains-every", "2", "--batch-size", "16"])
    assert len(pngs(out)) == 16 and len(list((out / "chains").glob("*.png"))) == 16
    with pytest.raises(UserError, match=r"temperature 0.65 .*available: 0.7, 1"):
        sample_main([str(bundle), "--n", "1", "--out", str(tmp_path / "x"), "--init", "low-temp", "--temperature", "0.65"])

    # What App. E prescribes: x0 drawn at t = 0.7 with the readjusted statistics, then encoded with the
    # original ones. With 0 steps the chain's decoder sample reproduces x0 (decode inverts the encoding).
    sampler = load_bundle(bundle)
    out = sampler.sample_indices([0, 1, 2], seed=5, steps=0, init="low-temp", temperature=0.7)
    noise = PerChainNoise([chain_seed(5, i) for i in range(3)]).initial(sampler.noise_shapes)
    vae = sampler.vae
    with torch.no_grad():
        plain = vae.decode(noise[:-1], noise[-1], 0.7).x_sample.clamp(-1, 1)
        with vae.temperature_statistics(0.7):
            readjusted = vae.decode(noise[:-1], noise[-1], 0.7).x_sample.clamp(-1, 1)
    assert (plain - readjusted).abs().max() > 1e-4  # the statistics matter here
    assert torch.allclose(out.sample, readjusted, atol=1e-5)


def test_python_api(bundle):
    sampler = load_bundle(bundle)
    images = sampler.sample(4, steps=2, seed=3, batch_size=2)
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 32, 32)
    assert torch.equal(to_uint8(sampler.sample_indices(range(4), 3, steps=2).mean), images)
    first = sampler.sample(2, steps=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, sampler.sample(2, steps=1, generator=torch.Generator().manual_seed(1)))
    energy = sampler.energy(images)
    assert energy.shape == (4,) and torch.allclose(energy, sampler.energy(images.float() / 255), atol=1e-5)
    x = images.float() / 127.5 - 1  # the network's own input range
    assert torch.allclose(energy, sampler.energy_net(x), atol=1e-5)
    score = sampler.log_density_unnormalized(images, num_samples=2, batch_size=4)
    assert score.shape == (4,) and torch.isfinite(score).all()
    assert torch.allclose(score, sampler.log_density_unnormalized(images, num_samples=2, batch_size=1), rtol=1e-5)
    assert torch.allclose(score, sampler.log_density_unnormalized(images.float() / 255, num_samples=2), rtol=1e-5)
    # Chains are recorded every k steps, start at the decoded initial noise and move.
    chains = sampler.sample_indices([0, 1], 3, steps=2, chains_every=1)
    assert chains.frame_steps == [0, 1, 2] and torch.equal(chains.frames[-1], chains.mean)
    noise = PerChainNoise([chain_seed(3, i) for i in range(2)]).initial(sampler.noise_shapes)
    assert torch.allclose(chains.frames[0], sampler.vae.decode(noise[:-1], None, 1.0).x_mean, atol=1e-6)
    assert (chains.frames[0] - chains.mean).abs().max() > 1e-3
    eps_z = [torch.randn(2, *s) for s in sampler.vae.latent_shapes]
    mean = sampler.decoder_mean(eps_z, temperature=0.8)  # soft-clamped only, as the official decoder mean
    assert mean.shape == (2, 3, 32, 32) and torch.equal(mean, sampler.vae.decode(eps_z, None, 0.8).x_mean)

    # The per-chain posterior walk is NVAE.encode_noise with the noise supplied instead of drawn.

    x = images.float() / 127.5 - 1
    eps_z, eps_x = sampler.vae.encode_noise(x, 1.0, True, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    q_eps = [torch.randn((4, *s), generator=generator) for s in sampler.vae.latent_shapes]
    walk_z, walk_x, _ = sampler.vae.posterior_noise(x, q_eps, 1.0)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip([*eps_z, eps_x], [*walk_z, walk_x]))


def test_nvae_only_bundle_samples_the_vae(nvae_run, tmp_path):
    bundle = tmp_path / "nvae"
    export_main([str(nvae_run), "--out", str(bundle), "--bn-passes", "1", "--temperatures", "0.6", "--raw"])
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["kind"] == "vae" and manifest["energy"] is None and manifest["sampling"]["steps"] == 0
    raw = load_file(latest_checkpoint(nvae_run) / "model.safetensors")
    assert all(torch.equal(raw[k], t) for k, t in load_file(bundle / "vae.safetensors").items())
    sample_main([str(bundle), "--n", "3", "--out", str(tmp_path / "s"), "--temperature", "0.6"])
    assert len(pngs(tmp_path / "s")) == 3
    # VAE-only sampling at an exported temperature uses its readjusted statistics (as NVAE does).
    sampler = load_bundle(bundle)
    out = sampler.sample_indices([0, 1], 0, temperature=0.6)
    noise = PerChainNoise([chain_seed(0, i) for i in range(2)]).initial(sampler.noise_shapes)
    with torch.no_grad(), sampler.vae.temperature_statistics(0.6):
        expected = sampler.vae.decode(noise[:-1], noise[-1], 0.6).x_mean
    assert torch.allclose(out.mean, expected, atol=1e-6)
    assert torch.equal(to_uint8(out.mean), torch.stack([torch.from_numpy(np.array(Image.open(tmp_path / "s" / f"{i:06d}.png"))).permute(2, 0, 1) for i in range(2)]))
    with pytest.raises(UserError, match="no energy network"):
        sample_main([str(bundle), "--n", "3", "--out", str(tmp_path / "t"), "--steps", "2"])


def test_toy_bundle_writes_points(tmp_path):
    torch.manual_seed(0)
    vae = MLPVAE(MLPVAEConfig(data_dim=2, latent_dim=4, hidden=16, depth=2))
    cfg = EnergyNetConfig(kind="mlp", input_dim=2, hidden=16, depth=2)
    bundle = save_bundle(tmp_path / "toy", vae, build_energy(cfg), cfg,
                         sampling={"steps": 3, "step_size": 1e-2, "temperature": 1.0, "autocast": "no"})
    for batch in ("4", "10"):
        sample_main([str(bundle), "--n", "10", "--out", str(tmp_path / f"b{batch}"), "--batch-size", batch,
                     "--init", "low-temp", "--temperature", "0.5"])
    files = [np.load(tmp_path / f"b{batch}" / "points-000000.npz") for batch in ("4", "10")]
    assert files[0]["points"].shape == (10, 2) and np.array_equal(files[0]["index"], np.arange(10))
    assert np.array_equal(files[0]["points"], files[1]["points"]) and np.array_equal(files[0]["means"], files[1]["means"])
    with pytest.raises(UserError, match="--format npz"):
        sample_main([str(bundle), "--n", "2", "--out", str(tmp_path / "png"), "--format", "png"])


def test_a_bundle_samples_with_the_metropolis_adjustment_it_was_trained_with(tmp_path):
    torch.manual_seed(0)
    vae = MLPVAE(MLPVAEConfig(data_dim=2, latent_dim=4, hidden=16, depth=2))
    cfg = EnergyNetConfig(kind="mlp", input_dim=2, hidden=16, depth=2)
    energy = build_energy(cfg)
    sampling = {"steps": 5, "step_size": 0.5, "temperature": 1.0, "autocast": "no"}  # large η: MALA refuses some moves
    adjusted = save_bundle(tmp_path / "mala", vae, energy, cfg, sampling={**sampling, "metropolis": True})
    plain = save_bundle(tmp_path / "ula", vae, energy, cfg, sampling=sampling)  # an older bundle: no key
    runs = {"mala": [str(adjusted)], "ula": [str(plain)], "ula-yes": [str(plain), "--metropolis", "yes"],
            "mala-no": [str(adjusted), "--metropolis", "no"]}
    points = {}
    for name, args in runs.items():
        sample_main([*args, "--n", "64", "--out", str(tmp_path / name)])
        points[name] = np.load(tmp_path / name / "points-000000.npz")["points"]
    assert np.array_equal(points["mala"], points["ula-yes"]) and np.array_equal(points["ula"], points["mala-no"])
    assert not np.allclose(points["mala"], points["ula"])
    assert load_bundle(adjusted).options().metropolis and not load_bundle(plain).options().metropolis


def test_bench_sample_reports_both_rates(bundle):
    from trainer.bench.sample import bench_sample

    result = bench_sample(bundle, n=2, batch_size=2, steps=1)
    assert result["kind"] == "vaebm" and result["steps"] == 1
    assert result["vae_img_per_s"] > 0 and result["vaebm_img_per_s"] > 0
    assert result["slowdown"] == pytest.approx(result["vae_img_per_s"] / result["vaebm_img_per_s"])
