"""VAEBM training end to end: layout, replay buffer in checkpoints, exact resume, divergence handling."""
import hashlib
import json
import shutil
import sys

import pytest
import torch
from conftest import FAST, run_script
from safetensors.torch import load_file

from trainer.ebm.objective import clip_to_adam_rms, ebm_loss, grad_leaves, input_slope_sq
from trainer.run.checkpoint import latest_checkpoint, list_checkpoints, read_torch
from trainer.run.divergence import DivergenceDetector

TINY = ["langevin.steps=2", "langevin.sample_steps=2", "replay.anneal_steps=2", "train.image_every=0"]


def vaebm_args(run_dir, nvae_run, cache_dir, *extra):
    return ["--config", "digits", "--vae", str(nvae_run), "--run-dir", str(run_dir), f"data.cache_dir={cache_dir}",
            *FAST, *TINY, *extra]


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_vaebm_run_layout_and_resume_with_buffer(tmp_path, nvae_run, cache_dir):
    run_dir = tmp_path / "run"
    run_script("train_vaebm.py", *vaebm_args(run_dir, nvae_run, cache_dir, "train.max_steps=3", "train.image_every=3"))
    last = rows(run_dir)[-1]
    for key in ("step", "energy_pos", "energy_neg", "energy_gap", "langevin_grad_norm", "replay_fill", "replay_p", "img_per_s"):
        assert key in last, key
    assert list((run_dir / "samples").glob("chains_vae_then_langevin-*.png"))
    checkpoint = latest_checkpoint(run_dir)
    buffer = read_torch(checkpoint / "rank-0" / "replay.pt")
    assert buffer["fill"] == 3 * 8

    result = run_script("train_vaebm.py", *vaebm_args(run_dir, nvae_run, cache_dir, "train.max_steps=5"))
    assert "resuming from step 3" in result.stderr
    assert rows(run_dir)[-1]["step"] == 5 and rows(run_dir)[-1]["replay_fill"] == 5 * 8  # the buffer carried over


@pytest.mark.slow
def test_vaebm_resume_is_exact(tmp_path, nvae_run, cache_dir):
    common = ["train.max_steps=4", "train.checkpoint_every=100"]
    run_script("train_vaebm.py", *vaebm_args(tmp_path / "straight", nvae_run, cache_dir, *common))
    run_script("train_vaebm.py", *vaebm_args(tmp_path / "paused", nvae_run, cache_dir, *common, "train.halt_at_step=2"))
    run_script("train_vaebm.py", *vaebm_args(tmp_path / "paused", nvae_run, cache_dir, *common))
    a, b = latest_checkpoint(tmp_path / "straight"), latest_checkpoint(tmp_path / "paused")
    weights_a, weights_b = load_file(str(a / "energy.safetensors")), load_file(str(b / "energy.safetensors"))
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    replay_a, replay_b = read_torch(a / "rank-0" / "replay.pt"), read_torch(b / "rank-0" / "replay.pt")
    assert replay_a["fill"] == 32 and identical(replay_a, replay_b)


def identical(a, b) -> bool:
    """Exact equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.slow
def test_injected_explosion_is_detected_and_not_resumed(tmp_path, nvae_run, cache_dir):
    run_dir = tmp_path / "run"
    args = vaebm_args(run_dir, nvae_run, cache_dir, "train.max_steps=12", "train.checkpoint_every=2",
                      "divergence.patience=2", "divergence.max_abs_energy=1e4")
    result = run_script("../tests/helpers/explode_vaebm.py", *args, launcher=[sys.executable], check=False)
    assert result.returncode == 3, result.stderr[-3000:]  # exit code 3: diverged (README, "Exit codes")
    assert "training diverged at step 6" in result.stderr and "|energy|" in result.stderr
    marker = json.loads((run_dir / "DIVERGED.json").read_text())
    assert marker["onset"] == 5 and marker["step"] == 6
    assert [step for step, _ in list_checkpoints(run_dir)] == [2, 4]  # nothing from the bad streak

    again = run_script("train_vaebm.py", *args, check=False)
    assert again.returncode == 2 and "diverged at step 6" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    same = run_script("train_vaebm.py", *args, "--resume-from", str(run_dir / "checkpoints/step-0000004"), check=False)
    assert same.returncode == 2 and "exact settings" in same.stderr
    resumed = run_script("train_vaebm.py", *args, "optim.lr=1e-5", "train.max_steps=6",
                         "--resume-from", str(run_dir / "checkpoints/step-0000004"))
    assert "resuming from step 4" in resumed.stderr
    assert not (run_dir / "DIVERGED.json").exists() and latest_checkpoint(run_dir).name == "step-0000006"


def test_divergence_detector_patience_and_reset():
    detector = DivergenceDetector(max_abs_energy=10, max_energy_gap=5, patience=3)
    assert detector.check(1, 0.0, 1.0) is None
    assert detector.check(2, 0.0, 6.0) is None and detector.in_bad_streak  # gap 6 > 5
    assert detector.check(3, 0.0, 1.0) is None and not detector.in_bad_streak  # streak broken
    assert detector.check(4, float("nan"), 0.0) is None
    assert detector.check(5, 20.0, 20.0) is None
    found = detector.check(6, 0.0, 0.0, grads_finite=False)
    assert found is not None and found.onset == 4 and found.metric == "non-finite gradient"


def test_ebm_loss_terms():
    loss, terms = ebm_loss(torch.tensor([1.0, 3.0]), torch.tensor([5.0, 7.0]), torch.tensor(10.0), 0.2)
    assert float(loss) == 2.0 - 6.0 + 2.0 and terms["energy_gap"] == 4.0


def test_slope_penalty_is_the_mean_squared_input_gradient_and_trains_the_energy():
    """E(x) = a·‖x‖² per row: ∇E = 2a·x, so the penalty is mean 4a²‖x‖², and its derivative in a is 8a·mean ‖x‖²
    (double backpropagation reaches the parameters); over a list of inputs the squared norms add up."""
    a = torch.tensor(0.7, requires_grad=True)
    x = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    inputs = grad_leaves(x)
    slope = input_slope_sq((a * inputs.pow(2)).flatten(1).sum(1), inputs)
    norms = x.pow(2).flatten(1).sum(1)
    assert torch.allclose(slope, 4 * 0.7 ** 2 * norms.mean())
    (grad_a,) = torch.autograd.grad(slope, a)
    assert torch.allclose(grad_a, 8 * 0.7 * norms.mean())
    pair = grad_leaves([x, 2 * x])
    slope = input_slope_sq(a * (pair[0].pow(2).flatten(1).sum(1) + pair[1].pow(2).flatten(1).sum(1)), pair)
    assert torch.allclose(slope, 4 * 0.7 ** 2 * 5 * norms.mean())
    loss, terms = ebm_loss(torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor(0.0), 0.0, 0.0,
                           torch.tensor(3.0), 0.5)
    assert float(loss) == 1.0 - 2.0 + 0.5 * 3.0 and terms["slope_sq"] == 3.0


def test_clip_to_adam_rms_matches_formula():
    param = torch.nn.Parameter(torch.zeros(1000))
    optimizer = torch.optim.Adam([param], betas=(0.99, 0.999))
    param.grad = torch.full((1000,), 0.01)
    assert clip_to_adam_rms(optimizer) == 0.0  # no Adam state yet: nothing clipped on the first step
    optimizer.step()
    grad = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    param.grad = grad.clone()
    fraction = clip_to_adam_rms(optimizer)
    v = optimizer.state[param]["exp_avg_sq"]
    bound = 3 * (v / (1 - 0.999)).sqrt() + 0.1
    assert torch.allclose(param.grad, grad.clamp(-bound, bound))
    assert fraction == pytest.approx(float((grad.abs() > bound).float().mean()))


@pytest.mark.slow
def test_toy2d_pipeline_mlp_vae_then_vaebm(tmp_path):
    """The 2-D presets: the MLP VAE on 25-Gaussians, then an MLP energy on it; resume works the same way."""
    vae_dir, ebm_dir = tmp_path / "vae", tmp_path / "ebm"
    fast = ["train.progress_bar=false", "train.log_every=5", "train.per_device_batch_size=64", "train.global_batch_size=64"]
    run_script("train_nvae.py", "--config", "toy2d", "--run-dir", str(vae_dir), "train.max_steps=30", *fast)
    assert latest_checkpoint(vae_dir).name == "step-0000030"
    args = ["--config", "toy2d", "--vae", str(vae_dir), "--run-dir", str(ebm_dir), "langevin.steps=5", *fast]
    run_script("train_vaebm.py", *args, "train.max_steps=5")
    resumed = run_script("train_vaebm.py", *args, "train.max_steps=10")
    assert "resuming from step 5" in resumed.stderr
    last = rows(ebm_dir)[-1]
    assert last["step"] == 10 and all(abs(last[k]) < 1e3 for k in ("energy_pos", "energy_neg"))
    assert 0 < last["langevin_acceptance"] <= 1  # the preset's Metropolis-adjusted chains report their acceptance


@pytest.mark.slow
def test_an_energy_run_keeps_the_vae_it_started_with(tmp_path):
    """The first start pins the VAE checkpoint (path and SHA-256 in every checkpoint's state.json). The VAE run
    training on does not move it; the pinned checkpoint gone, a resume is refused in one line naming both until
    the user says --vae-changed-ok. (2-D toys: the same code as the NVAE, a hundred times cheaper.)"""
    vae_run, run_dir = tmp_path / "vae", tmp_path / "ebm"
    fast = ["train.progress_bar=false", "train.log_every=5", "train.per_device_batch_size=64",
            "train.global_batch_size=64", "train.checkpoint_every=10"]
    train_vae = ["--config", "toy2d", "--run-dir", str(vae_run), *fast]
    run_script("train_nvae.py", *train_vae, "train.max_steps=10")
    args = ["--config", "toy2d", "--vae", str(vae_run), "--run-dir", str(run_dir), "langevin.steps=2", *fast]
    run_script("train_vaebm.py", *args, "train.max_steps=2")
    pinned = json.loads((latest_checkpoint(run_dir) / "state.json").read_text())
    first_vae = latest_checkpoint(vae_run)
    assert pinned["vae_checkpoint"] == str(first_vae.resolve()) and pinned["vae_weights"] == "ema"
    assert pinned["vae_sha256"] == hashlib.sha256((first_vae / "ema.safetensors").read_bytes()).hexdigest()

    run_script("train_nvae.py", *train_vae, "train.max_steps=20")
    assert latest_checkpoint(vae_run) != first_vae  # the VAE run moved on
    again = run_script("train_vaebm.py", *args, "train.max_steps=3")
    assert f"VAE {first_vae.resolve()}" in again.stderr  # still the pinned one

    shutil.rmtree(first_vae)
    refused = run_script("train_vaebm.py", *args, "train.max_steps=4", check=False)
    line = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode == 2 and line.startswith("error: this energy run trained against VAE checkpoint")
    assert str(first_vae.resolve()) in line and str(latest_checkpoint(vae_run)) in line and "--vae-changed-ok" in line
    run_script("train_vaebm.py", *args, "train.max_steps=4", "--vae-changed-ok")
    now = json.loads((latest_checkpoint(run_dir) / "state.json").read_text())
    assert now["vae_checkpoint"] == str(latest_checkpoint(vae_run).resolve()) and now["step"] == 4
