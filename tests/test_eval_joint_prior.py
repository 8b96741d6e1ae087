"""The joint-prior evaluation experiment: its flags, and one tiny end-to-end run through scripts/evaluate.py."""
import argparse
import json
import math

import pytest
from conftest import run_script

from trainer.errors import UserError
from trainer.evaluation import joint_prior

pytestmark = pytest.mark.slow  # an end-to-end experiment


def parse(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    joint_prior.add_arguments(parser)
    return parser.parse_args(list(flags))


def test_flags_override_the_quick_and_full_tables():
    settings, parts, steps = joint_prior.resolve(parse("--quick"))
    assert settings == joint_prior.QUICK and parts == list(joint_prior.PARTS) and steps == [10, 20, 40]
    settings, parts, steps = joint_prior.resolve(parse("--nvae-steps", "7", "--ablation", "sample", "--parts", "hvae",
                                                       "--ablation-steps", "5,9"))
    assert (settings.digits_nvae_steps, settings.stacked_nvae_steps) == (7, 7)
    assert settings.ablation == "sample" and settings.samples == joint_prior.FULL.samples
    assert parts == ["hvae"] and steps == [5, 9]
    for bad in (["--parts", "digits,cifar"], ["--ablation", "both"], ["--samples", "0"], ["--ablation-steps", "10,x"],
                ["--ablation-steps", "0"]):
        with pytest.raises(UserError):
            joint_prior.resolve(parse(*bad))


def test_joint_prior_end_to_end(tmp_path, cache_dir):
    """Every part with tiny models: base VAEs, joint priors (the ablation trains one energy per K), FDs, modes."""
    out = tmp_path / "joint.json"
    tiny = ["train.global_batch_size=8", "train.per_device_batch_size=8", "train.checkpoint_every=1000"]
    energy = [*tiny, "langevin.steps=2", "langevin.sample_steps=2", "energy.hidden=8", "energy.depth=1"]
    result = run_script(
        "evaluate.py", "joint-prior", "--quick", "--out", str(out), "--run-dir", str(tmp_path / "run"),
        "--data-cache", str(cache_dir), "--nvae-steps", "2", "--joint-steps", "2", "--hvae-steps", "2",
        "--hvae-joint-steps", "2", "--samples", "24", "--mode-samples", "24", "--bn-passes", "2",
        "--ablation", "train", "--ablation-steps", "1,2",
        *[f"--nvae-set={o}" for o in tiny], *[f"--hvae-set={o}" for o in tiny],
        *[f"--joint-set={o}" for o in energy], *[f"--hvae-joint-set={o}" for o in energy])
    data = json.loads(out.read_text())
    assert data["experiment"] == "joint-prior" and "joint_fd" in result.stdout
    fds = ["base_fd", "base_fd_train_bn", "joint_fd", "joint_fd_steps_1", "joint_fd_steps_2", "train_fd",
           "hvae_base_fd", "hvae_joint_fd", "hvae_joint_fd_steps_1", "hvae_joint_fd_steps_2", "hvae_train_fd"]
    for key in fds + ["base_kl", "base_kl_train_bn", "joint_kl", "data_kl", "joint_energy_gap", "hvae_joint_energy_gap"]:
        assert math.isfinite(data[key]) and (key.endswith("energy_gap") or data[key] >= 0), (key, data[key])
    assert data["joint_fd"] == data["joint_fd_steps_2"]  # the preset's K (set to 2 here) is the headline number
    assert data["train_fd"] < data["base_fd"]  # real digits are closer to real digits than a 2-step VAE's samples
    for key in ("base_modes", "base_modes_train_bn", "joint_modes", "data_modes"):
        assert 1 <= data[key] <= 24
    assert data["samples"] == 24 and data["mode_samples"] == 24 and data["ablation"] == "train"
    # The energies trained on the NVAE with BN statistics readjusted at t = 1, and their bases used those too: the
    # NVAE as trained (the reference) is a different model.
    assert data["joint_bn_statistics"].startswith("BN statistics readjusted at t=1 (2 passes")
    assert data["stacked_joint_bn_statistics"] == data["joint_bn_statistics"]
    assert data["base_fd_train_bn"] != data["base_fd"] and data["base_modes_train_bn"] >= 1
    assert len(data["per_seed"]) == 1 and data["seeds"] == [0] and "base_fd_seed_stderr" not in data
    assert data["per_seed"][0]["joint_energy_gap_curve"][-1][0] == 2  # [step, gap] of the last logged step
    # One energy per ablation K on each base (K = 2 is the preset's run, so it is not trained twice).
    names = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "run" / "models").iterdir() if p.name[0] != ".")
    assert names == ["digit-classifier-16", "digit-classifier-8", "nvae-digits16", "nvae-stacked-digits",
                     "nvae-vamp-digits", "vaebm-joint-prior-digits16", "vaebm-joint-prior-digits16",
                     "vaebm-joint-prior-hvae-digits", "vaebm-joint-prior-hvae-digits",
                     "vaebm-joint-prior-stacked-digits"]
    assert (tmp_path / "run" / "samples_joint_steps_2.png").is_file()
