"""NVAE training end to end: run directory layout, resume by re-running, exact resume, learning."""
import json

import pytest
import torch
from conftest import FAST, run_script
from safetensors.torch import load_file

from trainer.run.checkpoint import latest_checkpoint, read_torch

ACCELERATE = ["accelerate", "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]


@pytest.mark.slow
def test_accelerate_launch_writes_run_and_resumes(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    common = ["--config", "digits", "--run-dir", str(run_dir), f"data.cache_dir={cache_dir}", *FAST,
              "train.checkpoint_every=3", "train.image_every=3"]
    run_script("train_nvae.py", *common, "train.max_steps=3", launcher=ACCELERATE)
    assert (run_dir / "config.yaml").is_file()
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert list((run_dir / "samples").glob("samples_temperature_0.6-1.0-*.png"))
    assert list((run_dir / "samples").glob("reconstructions-*.png"))
    rows = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert {"step", "loss", "recon", "kl", "lr", "img_per_s"} <= set(rows[-1])
    checkpoint = latest_checkpoint(run_dir)
    assert checkpoint.name == "step-0000003"
    assert {p.name for p in checkpoint.iterdir()} >= {"manifest.json", "model.safetensors", "ema.safetensors",
                                                     "optimizer.pt", "state.json", "rank-0"}

    result = run_script("train_nvae.py", *common, "train.max_steps=5", launcher=ACCELERATE)
    assert "resuming from step 3" in result.stderr
    assert latest_checkpoint(run_dir).name == "step-0000005"
    steps = [json.loads(line)["step"] for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 5 and len(steps) == len(set(steps))


def _final_state(run_dir):
    checkpoint = latest_checkpoint(run_dir)
    optimizer = read_torch(checkpoint / "optimizer.pt")
    return (load_file(str(checkpoint / "model.safetensors")), load_file(str(checkpoint / "ema.safetensors")),
            optimizer["state"])


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(tmp_path, cache_dir):
    """CPU fp32: stopping at step 3 and re-running gives bit-identical weights, EMA and optimizer at step 6."""
    common = ["--config", "digits", f"data.cache_dir={cache_dir}", *FAST, "train.max_steps=6",
              "train.checkpoint_every=100", "train.image_every=0", "data.num_workers=2"]
    run_script("train_nvae.py", "--run-dir", str(tmp_path / "straight"), *common)
    run_script("train_nvae.py", "--run-dir", str(tmp_path / "paused"), *common, "train.halt_at_step=3")
    assert latest_checkpoint(tmp_path / "paused").name == "step-0000003"
    run_script("train_nvae.py", "--run-dir", str(tmp_path / "paused"), *common)

    straight, paused = _final_state(tmp_path / "straight"), _final_state(tmp_path / "paused")
    for a, b in zip(straight[:2], paused[:2]):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    for index in straight[2]:
        for name, value in straight[2][index].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(paused[2][index][name])), (index, name)


@pytest.mark.slow
def test_loss_decreases_on_digits(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    run_script("train_nvae.py", "--config", "digits", "--run-dir", str(run_dir), f"data.cache_dir={cache_dir}",
               *FAST, "train.max_steps=40", "train.checkpoint_every=100", "train.image_every=0", "train.log_every=5")
    rows = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    first, last = rows[0]["recon"], rows[-1]["recon"]
    assert last < 0.8 * first, (first, last)


def test_model_change_in_existing_run_is_refused(nvae_run, cache_dir):
    result = run_script("train_nvae.py", "--config", "digits", "--run-dir", str(nvae_run), "model.channels_enc=8",
                        f"data.cache_dir={cache_dir}", *FAST, check=False)
    assert result.returncode == 2 and "different network" in result.stderr
