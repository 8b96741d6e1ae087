"""The quick start (`scripts/quickstart.py`): the recognizability measure it prints, and the whole pipeline on a
small budget (`--scale`), ending with its picture and `summary.json`."""
import json

import numpy as np
import pytest
import torch
from conftest import run_script
from PIL import Image

from data.bundled import load_digits_images
from trainer.evaluation.digit_classifier import train_classifier
from trainer.evaluation.quickstart import CELL, recognizable


def test_recognizable_tells_digits_from_scrambled_digits():
    """The share the quick start prints: high on held-out real digits, near zero on the same digits with their
    pixels shuffled (same grey levels, no shape), so a blob-producing NVAE cannot score well."""
    judge = train_classifier(16, seed=0, epochs=10)
    images, _ = load_digits_images(16)
    real = torch.from_numpy(images[-300:]).permute(0, 3, 1, 2).contiguous()  # uint8 [300, 3, 16, 16]
    generator = torch.Generator().manual_seed(0)
    flat = real.flatten(2)
    scrambled = flat[:, :, torch.randperm(flat.shape[2], generator=generator)].reshape(real.shape)
    assert recognizable(judge, real, 0.9) > 0.8
    assert recognizable(judge, scrambled, 0.9) < 0.15


@pytest.mark.slow
def test_quickstart_on_a_small_budget_writes_its_picture_and_shares(tmp_path):
    out = tmp_path / "qs"
    result = run_script("quickstart.py", "--out", str(out), "--scale", "0.005", timeout=900)
    for header in ("== 1/4 NVAE", "== 2/4 VAEBM", "== 3/4 25-Gaussians", "== 4/4 the picture",
                   "python scripts/train_nvae.py --config vamp-top-digits16"):
        assert header in result.stderr, result.stderr[-3000:]
    assert "DeepSpeed" not in result.stderr and "accelerator" not in result.stderr.lower()
    summary = json.loads((out / "summary.json").read_text())
    for key in ("nvae_recognizable", "langevin_recognizable", "toy_vae_near_mode", "toy_vaebm_near_mode"):
        assert 0.0 <= summary[key] <= 1.0, (key, summary[key])
    assert summary["toy_data_near_mode"] > 0.9  # the truth's own points: the near-mode measure works
    assert summary["toy_points"] == 2_000  # a small --scale shrinks the 25-Gaussians panels too (not below 2,000)
    picture = np.asarray(Image.open(out / "quickstart.png"))
    assert picture.shape[1] >= 12 * CELL and picture.shape[0] >= 6 * CELL and picture.std() > 20


@pytest.mark.slow
def test_a_stop_file_stops_the_quickstart(tmp_path):
    """STOP in the first stage's run directory: the stage checkpoints, the quick start ends (exit 0) without
    going on to the energy stage, and says how to continue."""
    out = tmp_path / "qs"
    (out / "nvae").mkdir(parents=True)
    (out / "nvae" / "STOP").touch()
    result = run_script("quickstart.py", "--out", str(out), "--scale", "0.01", timeout=600)
    assert "stopped at step" in result.stderr and "re-run the same command" in result.stderr
    assert not (out / "vaebm").exists()
