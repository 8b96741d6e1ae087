"""The BN statistics of an energy on an NVAE (README, "BN statistics of an energy"; `vae.bn_temperature`): readjusted
once before training, kept in every checkpoint, reused on resume (a checkpoint trained with other statistics is
refused), and carried by the bundle as its original statistics, so the VAE's samples (the base) and the energy's
chains decode with the same statistics."""
import json

import pytest
import torch
from conftest import FAST, run_script

from trainer.config.ebm import VAEBMTrainingConfig
from trainer.config.loader import load_config, save_config
from trainer.ebm.sources import BN_FILE, FrozenBN, frozen_bn, load_frozen_vae
from trainer.errors import UserError
from trainer.run.checkpoint import Checkpoint, CheckpointSaver, latest_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")
QUICK_BN = ["vae.bn_passes=3", "vae.bn_batch_size=4"]


def config(nvae_run, preset: str = "joint-prior-digits", *overrides: str) -> VAEBMTrainingConfig:
    return load_config(VAEBMTrainingConfig, "vaebm", preset, [f"vae.path={nvae_run}", *QUICK_BN, *overrides])


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bn_temperature_resolves_per_method():
    cfg = lambda preset, *o: load_config(VAEBMTrainingConfig, "vaebm", preset, ["vae.path=/x", *o])
    assert cfg("joint-prior-digits").vae.bn_temperature == "auto"
    assert cfg("joint-prior-digits").vae.bn_temperature_for("joint-prior") == 1.0  # the sampling temperature
    assert cfg("latent-tilting-digits", "vae.temperature=0.8").vae.bn_temperature_for("latent-tilting") == 0.8
    assert cfg("digits").vae.bn_temperature_for("vaebm") is None  # VAEBM trains on the NVAE as trained
    assert cfg("joint-prior-digits", "vae.finetune=true").vae.bn_temperature_for("joint-prior") is None
    assert cfg("digits", "vae.bn_temperature=0.7").vae.bn_temperature_for("vaebm") == 0.7
    assert cfg("joint-prior-digits", "vae.bn_temperature=null").vae.bn_temperature_for("joint-prior") is None
    for bad, key in (("vae.bn_temperature=warm", "bn_temperature"), ("vae.bn_temperature=0", "bn_temperature"),
                     ("vae.bn_passes=0", "bn_passes")):
        with pytest.raises(UserError, match=key):
            cfg("digits", bad)
    with pytest.raises(UserError, match="finetune"):
        cfg("joint-prior-digits", "vae.finetune=true", "vae.bn_temperature=1.0")


def write_energy_run(run_dir, cfg: VAEBMTrainingConfig, vae, bn: FrozenBN):
    """A joint-prior run directory as the loop leaves it (config, one checkpoint) with an untrained energy."""
    from models.energy import build_energy

    run_dir.mkdir(parents=True)
    save_config(cfg, run_dir / "config.yaml")
    energy = build_energy(cfg.energy, vae.z_shapes)
    saver = CheckpointSaver(run_dir, rank=0, world_size=1, is_main=True, barrier=lambda: None, keep=2)
    state = {"step": 1, "kind": "vaebm", "vae_checkpoint": "", "divergence": {"onset": None, "streak": 0},
             "deepspeed": False, "vae_bn": bn.record}
    return saver.save(1, shared={"energy.safetensors": energy.state_dict(), "state.json": state,
                                 **bn.checkpoint_files()}, per_rank={})


def test_statistics_are_readjusted_once_kept_and_reused_on_resume(nvae_run, tmp_path):
    vae, _ = load_frozen_vae(nvae_run, "ema", "cpu")
    trained = vae.bn_statistics()
    cfg = config(nvae_run)
    bn = frozen_bn(vae, cfg, None)
    assert bn.record == {"readjusted": True, "temperature": 1.0, "passes": 3, "batch_size": 4, "seed": 0}
    assert same(bn.statistics, vae.bn_statistics()) and not same(bn.statistics, trained)
    twin, _ = load_frozen_vae(nvae_run, "ema", "cpu")
    assert same(frozen_bn(twin, cfg, None).statistics, bn.statistics)  # seeded: the same statistics again
    vaebm, _ = load_frozen_vae(nvae_run, "ema", "cpu")
    assert frozen_bn(vaebm, config(nvae_run, "digits"), None).record == {"readjusted": False}
    assert same(vaebm.bn_statistics(), trained)

    # Resume: the checkpoint's statistics, never a new readjustment.
    checkpoint = write_energy_run(tmp_path / "run", cfg, vae, bn)
    assert same(Checkpoint(checkpoint).tensors(BN_FILE), bn.statistics)
    resumed, _ = load_frozen_vae(nvae_run, "ema", "cpu")
    resumed.readjust_bn = None  # calling it would fail
    assert same(frozen_bn(resumed, cfg, checkpoint).statistics, bn.statistics)
    assert same(resumed.bn_statistics(), bn.statistics)
    for other in (config(nvae_run, "joint-prior-digits", "vae.bn_temperature=null"),
                  config(nvae_run, "joint-prior-digits", "vae.bn_seed=1")):
        with pytest.raises(UserError, match="was trained with BN statistics readjusted"):
            frozen_bn(load_frozen_vae(nvae_run, "ema", "cpu")[0], other, checkpoint)
    as_trained = write_energy_run(tmp_path / "old", config(nvae_run, "joint-prior-digits", "vae.bn_temperature=null"),
                                  vae, FrozenBN())
    with pytest.raises(UserError, match="as trained"):
        frozen_bn(load_frozen_vae(nvae_run, "ema", "cpu")[0], cfg, as_trained)


def test_the_bundle_decodes_base_and_chains_with_the_energys_statistics(nvae_run, tmp_path):
    import models
    from models.langevin import PerChainNoise, chain_seed
    from trainer.export import export_run

    vae, _ = load_frozen_vae(nvae_run, "ema", "cpu")
    trained = vae.bn_statistics()
    cfg = config(nvae_run, "joint-prior-digits", "energy.hidden=8", "langevin.sample_steps=1")
    bn = frozen_bn(vae, cfg, None)
    write_energy_run(tmp_path / "run", cfg, vae, bn)
    export_run(tmp_path / "run", tmp_path / "bundle", temperatures=(0.7, 1.0), bn_passes=2, bn_batch_size=4,
               log=lambda message: None)
    manifest = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    assert manifest["bn"]["energy_statistics"] == bn.record and manifest["bn"]["temperatures"] == [0.7, 1.0]
    sampler = models.load_bundle(tmp_path / "bundle")
    assert same(sampler.vae.bn_statistics(), bn.statistics)  # the original statistics are the energy's
    with sampler.vae.temperature_statistics(1.0):  # ... and so are the cached ones of t = 1, exactly
        assert same(sampler.vae.bn_statistics(), bn.statistics)
    with sampler.vae.temperature_statistics(0.7):
        assert not same(sampler.vae.bn_statistics(), bn.statistics)

    # The base (0 steps) is decoded with the energy's statistics: the decoder means of the chains' initial noise.
    noise = PerChainNoise([chain_seed(5, i) for i in range(3)]).initial(sampler.noise_shapes)
    base = sampler.sample_indices(range(3), seed=5, steps=0).mean
    with torch.no_grad():
        torch.testing.assert_close(base, sampler.vae.decode(noise[:-1], noise[-1]).x_mean, rtol=0, atol=1e-6)
        sampler.vae.load_bn_statistics(trained)
        assert (sampler.vae.decode(noise[:-1], noise[-1]).x_mean - base).abs().max() > 1e-3


@pytest.mark.slow
def test_energy_training_keeps_its_statistics_resumes_exactly_and_samples(nvae_run, tmp_path):
    """Through the scripts: train (halted and resumed) a joint prior on an NVAE; the checkpoints keep the readjusted
    statistics, the resumed run equals the straight one, export and sample.py work."""
    from safetensors.torch import load_file

    straight, paused = tmp_path / "straight", tmp_path / "paused"

    def args(run_dir):
        return ["--config", "joint-prior-digits", "--vae", str(nvae_run), "--run-dir", str(run_dir), *FAST, *QUICK_BN,
                "energy.hidden=8", "langevin.steps=2", "langevin.sample_steps=2", "train.max_steps=4"]

    run_script("train_vaebm.py", *args(straight))
    run_script("train_vaebm.py", *args(paused), "train.halt_at_step=2")
    resumed = run_script("train_vaebm.py", *args(paused))
    assert "readjusted at t=1" in resumed.stderr and "readjusting" not in resumed.stdout
    checkpoints = [Checkpoint(latest_checkpoint(run)) for run in (straight, paused)]
    assert all(c.json("state.json")["vae_bn"]["readjusted"] for c in checkpoints)
    assert same(checkpoints[0].tensors(BN_FILE), checkpoints[1].tensors(BN_FILE))
    for a, b in zip(*(load_file(str(c.path / "energy.safetensors")).items() for c in checkpoints)):
        assert a[0] == b[0] and torch.equal(a[1], b[1]), a[0]
    run_script("export.py", str(straight), "--out", str(tmp_path / "bundle"), "--temperatures", "1.0",
               "--bn-passes", "2")
    run_script("sample.py", str(tmp_path / "bundle"), "--n", "4", "--out", str(tmp_path / "samples"), "--steps", "1")
    assert len(list((tmp_path / "samples").glob("*.png"))) == 4
