"""The toy-likelihood experiment (VAEBM §5.4): the true mixture's likelihood, the log Z estimators, and a
tiny end-to-end run of `scripts/evaluate.py toy-likelihood`."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, run_script

from data.toy2d import Gaussians25
from trainer.evaluation.toy_metrics import (
    chunked,
    log_integral_on_grid,
    log_mean_exp,
    log_partition_from_base_samples,
    mean_and_stderr,
    square_grid,
)


def test_default_mixture_has_the_papers_true_log_likelihood():
    mixture = Gaussians25()
    assert mixture.expected_log_prob() == pytest.approx(-1.10, abs=1e-9)  # the std is solved for −1.10
    assert 0.083 < mixture.std < 0.085  # "about 0.084 × the grid spacing"
    x = mixture.sample(200_000, torch.Generator().manual_seed(0))
    mc, stderr = mean_and_stderr(mixture.log_prob(x.double()))
    assert abs(mc - (-1.10)) < 4 * stderr, (mc, stderr)
    # ∫ p log p by the midpoint rule agrees with the analytic value to far below the Monte Carlo error.
    grid, area = square_grid(3.0, 0.01)
    log_p = mixture.log_prob(grid.double())
    assert float((log_p.exp() * log_p).sum() * area) == pytest.approx(-1.10, abs=1e-5)


def test_expected_log_prob_is_a_lower_bound_that_fails_for_overlapping_components():
    mixture = Gaussians25(std=0.3)  # neighbours 3.3 std apart: the overlap matters
    grid, area = square_grid(4.0, 0.02)
    log_p = mixture.log_prob(grid.double())
    exact = float((log_p.exp() * log_p).sum() * area)
    assert mixture.expected_log_prob() < exact - 0.3


def test_log_partition_of_a_constant_energy_is_minus_the_constant():
    estimate = log_partition_from_base_samples(torch.full((1000,), 2.5))
    assert estimate.value == pytest.approx(-2.5, abs=1e-12)
    assert estimate.stderr == 0.0 and estimate.ess == pytest.approx(1000.0)


@pytest.mark.parametrize("curvature", [0.3, -0.2])
def test_log_partition_of_a_quadratic_tilt_of_a_gaussian(curvature):
    """Base N(0, I_d), E(x) = ½c‖x‖²: Z = (1 + c)^(−d/2), and the delta-method error matches its exact value."""
    d, n = 4, 200_000
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    estimate = log_partition_from_base_samples(0.5 * curvature * (x * x).sum(dim=1))
    exact = -0.5 * d * math.log1p(curvature)
    # Var(w)/Z² = E[w²]/Z² − 1 = (1 + c)^d / (1 + 2c)^(d/2) − 1 for w = exp(−E).
    exact_stderr = math.sqrt(((1 + curvature) ** d / (1 + 2 * curvature) ** (d / 2) - 1) / n)
    assert abs(estimate.value - exact) < 4 * exact_stderr, (estimate, exact)
    assert estimate.stderr == pytest.approx(exact_stderr, rel=0.1)
    assert 0 < estimate.ess < n


def test_log_mean_exp_is_stable_for_huge_log_weights():
    estimate = log_mean_exp(torch.tensor([1000.0, 1000.0 + math.log(3.0)], dtype=torch.float64))
    assert estimate.value == pytest.approx(1000.0 + math.log(2.0), abs=1e-9)
    with pytest.raises(ValueError):
        log_mean_exp(torch.tensor([0.0, float("nan")]))


def test_grid_integral_of_a_normalized_density_is_zero():
    grid, area = square_grid(3.0, 0.03)
    assert grid.shape == (200 * 200, 2) and area == pytest.approx(0.0009)
    assert log_integral_on_grid(Gaussians25().log_prob(grid.double()), area) == pytest.approx(0.0, abs=1e-6)
    gaussian = torch.distributions.MultivariateNormal(torch.tensor([0.3, -0.2]), torch.tensor([[0.5, 0.2], [0.2, 0.4]]))
    assert log_integral_on_grid(gaussian.log_prob(grid), area) == pytest.approx(0.0, abs=1e-4)
    # ... and of an unnormalized one, its log-normalizer: exp(−E) with E = ½‖x‖²/σ² integrates to 2πσ².
    assert log_integral_on_grid(-0.5 * (grid * grid).sum(1) / 0.25, area) == pytest.approx(math.log(2 * math.pi * 0.25), abs=1e-4)


def test_chunked_matches_one_pass():
    x = torch.randn(103, 2)
    assert torch.equal(chunked(lambda t: t.sum(dim=1), x, block=10), x.sum(dim=1))


@pytest.mark.slow
def test_toy_likelihood_end_to_end(tmp_path):
    out, run_dir = tmp_path / "toy.json", tmp_path / "run"
    run_script("evaluate.py", "toy-likelihood", "--quick", "--out", str(out), "--run-dir", str(run_dir),
               "--vae-steps", "30", "--ebm-steps", "3", "--test-points", "200", "--iwae-samples", "20",
               "--log-z-samples", "4000", "--grid-step", "0.25", "--grid-iwae-samples", "4", "--plot-points", "300",
               "--langevin-steps", "3", "--ebm-override", "langevin.steps=3", timeout=300)
    result = json.loads(out.read_text())
    for key in ("vae_ll", "vaebm_ll", "true_ll", "log_z", "log_z_stderr", "log_z_grid", "vae_log_mass_grid"):
        assert math.isfinite(result[key]), (key, result[key])
    assert result["experiment"] == "toy-likelihood" and result["test_points"] == 200
    assert abs(result["true_ll"] + 1.10) < 4 * result["true_ll_stderr"]
    # The two log Z estimators agree (Monte Carlo over VAE samples vs a grid integral), the VAE's density
    # integrates to about 1 on the grid, and the reference trainer (exact negatives) reported its own row.
    assert abs(result["log_z"] - result["log_z_grid"]) < 4 * result["log_z_stderr"] + 0.05, result
    assert abs(result["vae_log_mass_grid"]) < 0.1
    assert math.isfinite(result["vaebm_reference_ll"]) and math.isfinite(result["reference_log_z_grid"])
    # The reference resampled from the quick mode's pool; the method's energy kept Langevin negatives.
    configs = [yaml.safe_load(path.read_text()) for path in (run_dir / "models").glob("vaebm-toy2d-*/config.yaml")]
    assert sorted((c["langevin"]["negatives"], c["langevin"]["resample_pool"]) for c in configs) == [
        ("langevin", 16384), ("resample", 4096)]
    assert result["log_z_stderr"] > 0 and 0 < result["log_z_ess"] <= 4000
    for name in ("true", "vae", "vaebm_langevin", "vaebm_resampled"):
        assert (run_dir / f"samples_{name}.png").stat().st_size > 0


def test_a_finished_run_is_read_without_taking_its_lock(tmp_path, monkeypatch):
    """Experiments sharing a models folder reuse finished runs without resuming them (a resume takes the run's
    lock, so two experiments reading the same VAE collided); an unfinished or corrupt one is trained again."""
    import trainer.nvae.loop as nvae_loop
    from trainer.evaluation.train_models import finished, train_nvae_run
    from trainer.run.checkpoint import latest_checkpoint

    overrides = ["train.max_steps=4", "train.checkpoint_every=2", "train.log_every=2"]
    run_dir = train_nvae_run("toy2d", overrides, tmp_path, log=lambda line: None)
    assert finished(run_dir, 4) and not finished(run_dir, 6)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(nvae_loop, "train_nvae", no_training)
    assert train_nvae_run("toy2d", overrides, tmp_path, log=lambda line: None) == run_dir
    weights = next(path for path in latest_checkpoint(run_dir).iterdir() if path.suffix == ".safetensors")
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # same size, different bytes
    assert not finished(run_dir, 4)
    with pytest.raises(AssertionError, match="trained again"):
        train_nvae_run("toy2d", overrides, tmp_path, log=lambda line: None)


def test_an_energy_of_an_older_vae_checkpoint_is_not_reused(tmp_path):
    """An energy run belongs to the VAE checkpoint it trained against: once the VAE run has been trained further,
    asking for the same energy trains a new run (and the VAE's bundle is exported again), instead of handing
    back an energy, or samples, of the VAE as it was."""
    from trainer.evaluation.train_models import nvae_config, sampler_for, train_nvae_run, train_vaebm_run
    from trainer.nvae.loop import train_nvae
    from trainer.run.checkpoint import Checkpoint, latest_checkpoint

    quiet = {"log": lambda line: None}
    vae_overrides = ["train.max_steps=4", "train.checkpoint_every=2", "train.log_every=2"]
    vae_run = train_nvae_run("toy2d", vae_overrides, tmp_path, **quiet)
    energy = ["train.max_steps=2", "train.checkpoint_every=2", "train.log_every=1", "langevin.steps=2",
              "langevin.resample_pool=64", "train.global_batch_size=16", "train.per_device_batch_size=16"]
    first = train_vaebm_run("toy2d", vae_run, energy, tmp_path, **quiet)
    assert train_vaebm_run("toy2d", vae_run, energy, tmp_path, **quiet) == first  # found again
    first_bundle = sampler_for(vae_run, temperatures=(), **quiet)

    train_nvae(nvae_config("toy2d", [*vae_overrides[1:], "train.max_steps=6"]), vae_run)  # the VAE trained on
    second = train_vaebm_run("toy2d", vae_run, energy, tmp_path, **quiet)
    assert second != first and (second / "checkpoints").is_dir()
    pinned = [Checkpoint(latest_checkpoint(run)).json("state.json")["vae_checkpoint"] for run in (first, second)]
    assert [int(Path(path).name.split("-")[-1]) for path in pinned] == [4, 6]
    assert sampler_for(vae_run, temperatures=(), **quiet).vae is not first_bundle.vae
    assert sorted(path.name for path in vae_run.glob("bundle-*")) == ["bundle-tnone-bn500-s0-step4",
                                                                         "bundle-tnone-bn500-s0-step6"]


def test_a_stopped_training_ends_the_experiment_instead_of_being_scored(tmp_path):
    """The trainer returns normally when it is stopped early (a checkpoint at the current step), so the experiment
    has to notice: every model it trains must reach its last step, or the experiment ends (TrainingStopped)."""
    from trainer.errors import TrainingStopped
    from trainer.evaluation.train_models import train_nvae_run, train_vaebm_run

    quiet = {"log": lambda line: None}
    common = ["train.max_steps=6", "train.checkpoint_every=2", "train.log_every=2"]
    with pytest.raises(TrainingStopped, match=r"stopped at step 3 of 6, before the experiment had its results"):
        train_nvae_run("toy2d", [*common, "train.halt_at_step=3"], tmp_path, **quiet)
    vae_run = train_nvae_run("toy2d", common, tmp_path, **quiet)
    energy = ["train.max_steps=4", "train.log_every=1", "langevin.steps=2", "langevin.resample_pool=64",
              "train.global_batch_size=16", "train.per_device_batch_size=16"]
    with pytest.raises(TrainingStopped, match=r"vaebm-toy2d-\w+ stopped at step 2 of 4"):
        train_vaebm_run("toy2d", vae_run, [*energy, "train.halt_at_step=2"], tmp_path, **quiet)
    assert (train_vaebm_run("toy2d", vae_run, energy, tmp_path, **quiet) / "checkpoints").is_dir()


def test_sigterm_to_an_evaluation_stops_it_without_results(tmp_path):
    """SIGTERM while an evaluation trains (as a scheduler sends it): the training checkpoints, the evaluation
    exits 4 with one `stopped:` line and writes no result (it used to go on with the half-trained model)."""
    out, run_dir = tmp_path / "toy.json", tmp_path / "run"
    log = tmp_path / "log.txt"
    command = [sys.executable, str(ROOT / "scripts" / "evaluate.py"), "toy-likelihood", "--quick", "--out", str(out),
               "--run-dir", str(run_dir), "--vae-steps", "1000000"]
    with open(log, "w") as handle:
        evaluation = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT,
                                      env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
        try:
            deadline = time.monotonic() + 240
            while "starting:" not in log.read_text() and evaluation.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
            time.sleep(2)  # a few steps into the VAE's training
            evaluation.send_signal(signal.SIGTERM)
            code = evaluation.wait(timeout=120)  # the VAE checkpoints at once; a broken stop trains on for hours
        finally:
            evaluation.kill()
    lines = log.read_text().strip().splitlines()
    assert code == 4, lines[-10:]
    assert lines[-1].startswith("stopped: the training in ") and "run the same command again" in lines[-1]
    assert "stop requested (SIGTERM)" in log.read_text()
    assert not out.exists()
    status = json.loads(next((run_dir / "models").glob("nvae-toy2d-*/status.json")).read_text())
    assert status["state"] == "stopped" and 0 < status["step"] < 1_000_000


@pytest.mark.parametrize("preset", ["toy2d", "latent-tilting-toy2d"])
def test_a_diverged_energy_ends_the_experiment_with_what_to_change(tmp_path, preset):
    """An energy that diverges inside an experiment is one error naming its method, its run and what to change;
    for a latent energy that includes the Langevin step size (too small a one makes the energy diverge)."""
    from trainer.errors import UserError
    from trainer.evaluation.train_models import train_nvae_run, train_vaebm_run

    quiet = {"log": lambda line: None}
    vae_run = train_nvae_run("toy2d", ["train.max_steps=2", "train.checkpoint_every=2", "train.log_every=2"],
                             tmp_path, **quiet)
    energy = ["train.max_steps=4", "train.log_every=1", "langevin.steps=2", "langevin.resample_pool=64",
              "train.global_batch_size=16", "train.per_device_batch_size=16",
              "divergence.max_abs_energy=1e-12", "divergence.max_energy_gap=1e-12", "divergence.patience=1"]
    with pytest.raises(UserError) as raised:
        train_vaebm_run(preset, vae_run, energy, tmp_path, **quiet)
    message = str(raised.value)
    method = "vaebm" if preset == "toy2d" else "latent-tilting"
    assert message.startswith(f"{method} training diverged (see {tmp_path}/vaebm-{preset}-")
    assert "lower optim.lr or langevin.steps" in message
    assert ("raise langevin.step_size" in message) == (method != "vaebm")
    run_log = next(tmp_path.glob(f"vaebm-{preset}-*/log.txt")).read_text()  # the trainer's own last line says it too
    assert "Resume from one with changed settings (lower optim.lr or langevin.steps" in run_log
