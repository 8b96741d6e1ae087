"""DeepSpeed ZeRO-2 on CPU, one process: train, checkpoint, resume exactly, export a bundle.

Accelerate's DeepSpeed plugin reads the installed `transformers` version whenever it is active
(accelerate >= 1.0); pyproject depends on transformers, and these launches prove the path works.
Multi-rank DeepSpeed on CPU is not tested: Accelerate mis-reports ranks there (every process sees
itself as rank 0 of 1), so it is no faithful test; the multi-process equality tests use DDP.
"""
import re

import pytest
import torch
from conftest import FAST, ROOT, run_script
from safetensors.torch import load_file

from trainer.run.checkpoint import latest_checkpoint

ZERO2 = ["accelerate", "launch", "--use_deepspeed", "--zero_stage", "2", "--num_processes", "1",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def test_a_fresh_install_gets_what_the_deepspeed_plugin_reads():
    """Accelerate's DeepSpeed plugin reads the installed transformers version on every launch: the package
    must declare it (so a fresh install has it), and the plugin's own check must pass with what is installed."""
    import tomllib
    from accelerate.utils import DeepSpeedPlugin

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(re.match(r"transformers\b", requirement) for requirement in declared)
    DeepSpeedPlugin(zero_stage=2).set_deepspeed_weakref()  # raises PackageNotFoundError without transformers


@pytest.mark.slow  # DeepSpeed launches
def test_zero2_train_resume_exact_and_export(tmp_path, cache_dir):
    common = ["--config", "digits", f"data.cache_dir={cache_dir}", *FAST, "train.max_steps=4",
              "train.checkpoint_every=100", "train.image_every=0"]
    run_script("train_nvae.py", "--run-dir", str(tmp_path / "straight"), *common, launcher=ZERO2)
    run_script("train_nvae.py", "--run-dir", str(tmp_path / "paused"), *common, "train.halt_at_step=2", launcher=ZERO2)
    checkpoint = latest_checkpoint(tmp_path / "paused")
    assert checkpoint.name == "step-0000002" and (checkpoint / "deepspeed").is_dir()
    assert not (checkpoint / "optimizer.pt").exists()  # the optimizer lives in the engine's shards
    resumed = run_script("train_nvae.py", "--run-dir", str(tmp_path / "paused"), *common, launcher=ZERO2)
    assert "resuming from step 2" in resumed.stderr

    a = load_file(str(latest_checkpoint(tmp_path / "straight") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "paused") / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(v.dtype != torch.bfloat16 for v in a.values())  # consolidated fp32 weights

    bundle = tmp_path / "bundle"
    run_script("export.py", str(tmp_path / "paused"), "--out", str(bundle), "--temperatures", "1.0", "--bn-passes", "2")
    import models

    sampler = models.load_bundle(bundle)
    assert sampler.sample(2, seed=0).shape == (2, 3, 32, 32)
