"""Mixed precision through the real launcher (`accelerate launch --mixed_precision bf16|fp16`), on CPU.

bf16 runs under CPU autocast; fp16 runs under CPU autocast with `torch.amp.GradScaler("cpu")` (Accelerate
1.15 alone would silently train fp32 on a CPU: `trainer/run/launch.py` switches its AMP path on). Checked:
the losses are finite and close to fp32's, the run really ran in reduced precision, the fp16 loss scaler's
overflows are counted as skipped updates, its state survives a resume exactly, and the Langevin chains
and the replay buffer stay fp32.

Tolerances (relative to fp32, same seed, same data):
- bf16 keeps 8 significant bits (rounding up to 2^-9 ≈ 0.2% per operation). The NVAE terms are sums over
  thousands of pixels and latents accumulated in fp32 from bf16 activations: over 6 steps they moved at
  most 0.2 nats on a NELBO of 3,000–3,800 nats (the small KL term: 0.11 of 63 nats). Allowed: 1e-3 of the
  fp32 NELBO for every term (3–4 nats), far below one update's change (60–300 nats). VAEBM: deviations up
  to 0.4% (its loss is dominated by the spectral sum of a small net, its energies by a few sum-pooled
  features); allowed 2% + 0.02, about 5× the measured.
- fp16 keeps 11 bits (2^-12 ≈ 0.02%); it is compared with fp32 at step 1 only (the same weights): later
  steps differ by design, since the first NVAE steps overflow at the initial scale and are skipped.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import FAST, run_script
from safetensors.torch import load_file

from trainer.run.checkpoint import latest_checkpoint, read_torch

pytestmark = pytest.mark.slow


def launcher(precision: str) -> list[str]:
    return ["accelerate", "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", precision,
            "--dynamo_backend", "no"]


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]


def close(a: float, b: float, rtol: float, atol: float = 0.0) -> bool:
    return abs(a - b) <= atol + rtol * abs(b)


NVAE_STEPS = 6
NVAE_SETTINGS = [*FAST, "train.log_every=1", "train.image_every=0", "train.checkpoint_every=100",
                 f"train.max_steps={NVAE_STEPS}"]


@pytest.fixture(scope="module")
def nvae_runs(tmp_path_factory, cache_dir) -> dict:
    """The same 6-step NVAE run in fp32, bf16 and fp16 (run directories by precision)."""
    root = tmp_path_factory.mktemp("nvae-precision")
    runs = {}
    for precision in ("no", "bf16", "fp16"):
        runs[precision] = root / precision
        run_script("train_nvae.py", "--config", "digits", "--run-dir", str(runs[precision]), *NVAE_SETTINGS,
                   f"data.cache_dir={cache_dir}", launcher=launcher(precision))
    return runs


def test_nvae_bf16_tracks_fp32(nvae_runs):
    fp32, bf16 = rows(nvae_runs["no"]), rows(nvae_runs["bf16"])
    assert [r["step"] for r in bf16] == list(range(1, NVAE_STEPS + 1))
    assert "mixed precision bf16" in (nvae_runs["bf16"] / "log.txt").read_text()
    for ours, reference in zip(bf16, fp32):
        for key in ("loss", "recon", "kl", "nelbo"):
            assert math.isfinite(ours[key])
            allowed = 1e-3 * abs(reference["nelbo"])
            assert abs(ours[key] - reference[key]) <= allowed, (ours["step"], key, ours[key], reference[key])
        assert ours["skipped_updates"] == 0 and "loss_scale" not in ours
    assert any(ours["loss"] != reference["loss"] for ours, reference in zip(bf16, fp32))  # it did run in bf16
    assert not (latest_checkpoint(nvae_runs["bf16"]) / "scaler.pt").exists()


def test_nvae_fp16_scales_the_loss_and_counts_overflows(nvae_runs):
    """fp16: step 1 (the same weights) is close to fp32; every step the scaler skipped (an overflow halves
    the scale, growth comes only after 2000 good steps) is counted in `skipped_updates`; the steps after
    the overflows train; the scale is checkpointed."""
    fp32, fp16 = rows(nvae_runs["no"]), rows(nvae_runs["fp16"])
    assert "mixed precision fp16" in (nvae_runs["fp16"] / "log.txt").read_text()
    assert close(fp16[0]["loss"], fp32[0]["loss"], rtol=1e-4) and fp16[0]["loss"] != fp32[0]["loss"]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["nelbo"]) for r in fp16)
    for row in fp16:
        halvings = math.log2(1024.0 / row["loss_scale"])  # train.fp16_init_scale defaults to 1024
        assert row["skipped_updates"] == halvings, row
    skipped = fp16[-1]["skipped_updates"]
    assert 0 < skipped < NVAE_STEPS  # the first steps overflow at 1024 (measured: 4), the rest train
    assert fp16[-1]["loss"] != fp16[skipped]["loss"]
    checkpoint = latest_checkpoint(nvae_runs["fp16"])
    assert read_torch(checkpoint / "scaler.pt")["scale"] == fp16[-1]["loss_scale"]


def _final_weights(run_dir) -> dict[str, torch.Tensor]:
    checkpoint = latest_checkpoint(run_dir)
    return {**load_file(str(checkpoint / "model.safetensors")),
            **{f"ema.{k}": v for k, v in load_file(str(checkpoint / "ema.safetensors")).items()}}


def test_nvae_fp16_resume_restores_the_loss_scaler(nvae_runs, tmp_path, cache_dir):
    """Stopped at step 3 (mid-way through the overflows) and re-run: the same scaler state, skipped steps and
    weights at step 6 as the uninterrupted fp16 run."""
    paused = tmp_path / "paused"
    common = ["--config", "digits", "--run-dir", str(paused), *NVAE_SETTINGS, f"data.cache_dir={cache_dir}"]
    run_script("train_nvae.py", *common, "train.halt_at_step=3", launcher=launcher("fp16"))
    halted = latest_checkpoint(paused)
    assert halted.name == "step-0000003" and (halted / "scaler.pt").is_file()
    assert read_torch(halted / "scaler.pt")["scale"] < 1024.0  # a non-trivial state to restore
    run_script("train_nvae.py", *common, launcher=launcher("fp16"))

    straight = nvae_runs["fp16"]
    assert read_torch(latest_checkpoint(paused) / "scaler.pt") == read_torch(latest_checkpoint(straight) / "scaler.pt")
    assert rows(paused)[-1]["loss_scale"] == rows(straight)[-1]["loss_scale"]
    expected, got = _final_weights(straight), _final_weights(paused)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


VAEBM_STEPS = 4
# Chains of 3 Langevin steps instead of the preset's 10: precision is what is compared, and CPU fp16 convolutions
# run about 6x slower than fp32 ones (no fast CPU kernels), which made these runs the suite's slowest.
VAEBM_SETTINGS = [*FAST, "train.log_every=1", "train.image_every=0", "train.checkpoint_every=100",
                  f"train.max_steps={VAEBM_STEPS}", "langevin.steps=3"]


@pytest.fixture(scope="module")
def vaebm_runs(tmp_path_factory, cache_dir, nvae_run) -> dict:
    """The same 4-step VAEBM run in fp32, bf16 and fp16 on the session's tiny NVAE."""
    root = tmp_path_factory.mktemp("vaebm-precision")
    runs = {}
    for precision in ("no", "bf16", "fp16"):
        runs[precision] = root / precision
        run_script("train_vaebm.py", "--config", "digits", "--vae", str(nvae_run), "--run-dir", str(runs[precision]),
                   *VAEBM_SETTINGS, f"data.cache_dir={cache_dir}", launcher=launcher(precision))
    return runs


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_vaebm_reduced_precision_tracks_fp32(vaebm_runs, precision):
    fp32, ours = rows(vaebm_runs["no"]), rows(vaebm_runs[precision])
    assert [r["step"] for r in ours] == list(range(1, VAEBM_STEPS + 1))
    for row, reference in zip(ours, fp32):
        for key in ("loss", "energy_pos", "energy_neg", "spectral"):
            assert math.isfinite(row[key])
            assert close(row[key], reference[key], rtol=2e-2, atol=2e-2), (row["step"], key, row[key], reference[key])
        assert row["skipped_updates"] == 0  # no overflow at the default initial scale
    assert any(row["loss"] != reference["loss"] for row, reference in zip(ours, fp32))  # reduced precision ran
    assert ("loss_scale" in ours[-1]) == (precision == "fp16")
    assert (latest_checkpoint(vaebm_runs[precision]) / "scaler.pt").exists() == (precision == "fp16")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_vaebm_chains_and_replay_buffer_stay_fp32(vaebm_runs, precision):
    """The replay buffer holds the final ε_z of the Langevin chains: fp32, and not bf16/fp16-rounded values
    (chains kept in the reduced precision anywhere would leave only representable values)."""
    replay = read_torch(latest_checkpoint(vaebm_runs[precision]) / "rank-0" / "replay.pt")
    assert replay["fill"] == VAEBM_STEPS * 8  # every iteration pushed its 8 chains
    assert all(t.dtype == torch.float32 for t in replay["storage"])
    filled = torch.cat([t.flatten() for t in replay["storage"]])
    low = torch.bfloat16 if precision == "bf16" else torch.float16
    assert (filled.to(low).float() != filled).float().mean() > 0.5


def test_vaebm_fp16_resume_restores_the_loss_scaler(tmp_path, cache_dir, nvae_run):
    """At PyTorch's default initial scale (65536) the first energy steps overflow; a run stopped at step 2
    and re-run ends with the uninterrupted run's scaler state, skipped steps and energy weights."""
    straight, paused = tmp_path / "straight", tmp_path / "paused"

    def train(run_dir, *extra):
        run_script("train_vaebm.py", "--config", "digits", "--vae", str(nvae_run), "--run-dir", str(run_dir),
                   *VAEBM_SETTINGS, f"data.cache_dir={cache_dir}", "train.fp16_init_scale=65536", *extra,
                   launcher=launcher("fp16"))

    train(straight)
    train(paused, "train.halt_at_step=2")
    assert read_torch(latest_checkpoint(paused) / "scaler.pt")["scale"] < 65536.0
    train(paused)

    done = [latest_checkpoint(run) for run in (straight, paused)]
    assert read_torch(done[0] / "scaler.pt") == read_torch(done[1] / "scaler.pt")
    assert rows(straight)[-1]["skipped_updates"] == math.log2(65536.0 / rows(straight)[-1]["loss_scale"]) > 0
    expected, got = (load_file(str(c / "energy.safetensors")) for c in done)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_the_slope_penalty_is_refused_when_the_launcher_chooses_fp16(tmp_path, cache_dir, nvae_run):
    """`train.mixed_precision` is `auto` (as launched) and the launcher says fp16: the slope penalty's inner
    gradient would run unscaled, so the start is refused in one line, exit 2, before the run directory exists."""
    run_dir = tmp_path / "refused"
    result = run_script("train_vaebm.py", "--config", "digits", "--vae", str(nvae_run), "--run-dir", str(run_dir),
                        *VAEBM_SETTINGS, f"data.cache_dir={cache_dir}", "optim.slope_coeff=0.01",
                        launcher=launcher("fp16"), check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "optim.slope_coeff" in result.stderr and "Traceback" not in result.stderr
    assert not run_dir.exists()
