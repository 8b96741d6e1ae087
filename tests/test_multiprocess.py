"""Real 2-process launches on CPU (gloo, `accelerate launch`): with data.split=global, 2 processes × B/2
train like 1 process × B (NVAE with synchronized BN, VAEBM without replay), image grids are computed
collectively and equal, rank 0 alone writes the logs, and per-rank replay buffers and RNG states
round-trip through a checkpoint. Launches are shared between tests (module fixtures): each costs ~20 s."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import FAST, ROOT, free_port, run_script
from PIL import Image
from safetensors.torch import load_file

from trainer.run.checkpoint import latest_checkpoint, read_torch

pytestmark = pytest.mark.slow  # real multi-process launches

# On a CPU-only machine `--multi_gpu` is what makes accelerate start one process per rank (torchrun);
# the trainer then forms a gloo group.
TWO_PROCESSES = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no",
                 "--main_process_port", str(free_port())]
ONE = ["train.per_device_batch_size=8", "train.global_batch_size=8"]
TWO = ["train.per_device_batch_size=4", "train.global_batch_size=8"]
# fp32 on CPU: the runs differ only by float rounding (the order of sums). Measured: 2.6e-6 (NVAE, a
# BN bias whose gradient is zero up to rounding), 1.8e-6 (VAEBM); without sync BN or with the default
# shard split the difference is 1e-2 or more.
TOLERANCE = 1e-5


def max_relative_difference(a: dict, b: dict) -> float:
    """max over tensors of max|a − b| / max(1, max|a|) (floating tensors; others must be equal)."""
    assert a.keys() == b.keys()
    worst = 0.0
    for key in a:
        if not a[key].is_floating_point():
            assert torch.equal(a[key], b[key]), key
            continue
        scale = max(1.0, float(a[key].double().abs().max()))
        worst = max(worst, float((a[key].double() - b[key].double()).abs().max()) / scale)
    return worst


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(int)


def assert_same_grids(one, two) -> None:
    names = sorted(p.name for p in (one / "samples").iterdir())
    assert names and names == sorted(p.name for p in (two / "samples").iterdir())
    for name in names:  # uint8 grids: a rounding difference may at most flip one level
        assert np.abs(png(one / "samples" / name) - png(two / "samples" / name)).max() <= 1, name


@pytest.fixture(scope="module")
def nvae_runs(tmp_path_factory, cache_dir) -> dict:
    root = tmp_path_factory.mktemp("nvae-equality")
    common = ["--config", "digits", f"data.cache_dir={cache_dir}", *FAST, "train.max_steps=3", "train.log_every=1",
              "data.split=global"]
    run_script("train_nvae.py", "--run-dir", str(root / "one"), *common, *ONE)
    two = run_script("train_nvae.py", "--run-dir", str(root / "two"), *common, *TWO, launcher=TWO_PROCESSES)
    return {"one": root / "one", "two": root / "two", "stderr": two.stderr}


@pytest.fixture(scope="module")
def vaebm_runs(tmp_path_factory, cache_dir, nvae_runs) -> dict:
    """Replay off: per-process buffers would make the chains depend on the number of processes."""
    root = tmp_path_factory.mktemp("vaebm-equality")
    common = ["--config", "digits", "--vae", str(nvae_runs["one"]), f"data.cache_dir={cache_dir}", *FAST,
              "train.max_steps=3", "langevin.steps=2", "langevin.sample_steps=2", "replay.enabled=false",
              "optim.lr=1e-4", "data.split=global"]  # lr 1e-4, not 1e-5: the weights must move visibly
    run_script("train_vaebm.py", "--run-dir", str(root / "one"), *common, *ONE)
    run_script("train_vaebm.py", "--run-dir", str(root / "two"), *common, *TWO, launcher=TWO_PROCESSES)
    return {"one": root / "one", "two": root / "two"}


def test_nvae_two_processes_train_like_one(nvae_runs):
    assert "2 process(es), accumulation 1" in nvae_runs["stderr"]
    one, two = latest_checkpoint(nvae_runs["one"]), latest_checkpoint(nvae_runs["two"])
    assert one.name == two.name == "step-0000003"
    for name in ("model.safetensors", "ema.safetensors"):  # weights, BN running statistics, spectral u/v
        difference = max_relative_difference(load_file(str(one / name)), load_file(str(two / name)))
        print(f"NVAE {name}: max relative difference {difference:.3g}")
        assert difference < TOLERANCE, name
    states = [json.loads((two / f"rank-{r}" / "data.json").read_text()) for r in (0, 1)]
    assert [(s["rank"], s["split"]) for s in states] == [(0, "global"), (1, "global")]
    assert_same_grids(nvae_runs["one"], nvae_runs["two"])  # reconstructions and samples, computed collectively


def test_only_rank_zero_writes_logs(nvae_runs):
    lines = [line.split(" ", 2)[2] for line in (nvae_runs["two"] / "log.txt").read_text().splitlines()]
    assert len(lines) == len(set(lines)) == 2 and lines[0].startswith("starting") and lines[1].startswith("finished")
    steps = [json.loads(line)["step"] for line in (nvae_runs["two"] / "stats.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_vaebm_two_processes_train_like_one(vaebm_runs):
    one, two = latest_checkpoint(vaebm_runs["one"]), latest_checkpoint(vaebm_runs["two"])
    difference = max_relative_difference(load_file(str(one / "energy.safetensors")),
                                         load_file(str(two / "energy.safetensors")))
    print(f"VAEBM energy: max relative difference {difference:.3g}")
    assert difference < TOLERANCE
    assert_same_grids(vaebm_runs["one"], vaebm_runs["two"])  # chains before/after Langevin, per chain index


def test_replay_buffers_and_rng_round_trip_in_a_two_process_run(tmp_path, cache_dir, nvae_runs):
    """Default split; resuming a 2-process run from its step-2 checkpoint ends exactly like the run itself."""
    run_dir = tmp_path / "vaebm"
    args = ["--config", "digits", "--vae", str(nvae_runs["one"]), "--run-dir", str(run_dir),
            f"data.cache_dir={cache_dir}", *FAST, *TWO, "train.max_steps=3", "langevin.steps=2",
            "train.image_every=0", "train.checkpoint_every=1", "replay.anneal_steps=1"]
    run_script("train_vaebm.py", *args, launcher=TWO_PROCESSES)
    final = latest_checkpoint(run_dir)
    files = ["energy.safetensors", "optimizer.pt"] + [f"rank-{r}/{name}" for r in (0, 1)
                                                      for name in ("replay.pt", "rng.pt", "data.json")]
    straight = {name: (final / name).read_bytes() for name in files}
    buffers = [read_torch(final / f"rank-{r}" / "replay.pt") for r in (0, 1)]
    assert buffers[0]["fill"] == buffers[1]["fill"] == 3 * 4  # per-process buffers, 4 chains per step
    assert not torch.equal(buffers[0]["storage"][0], buffers[1]["storage"][0])  # chains seeded per rank

    result = run_script("train_vaebm.py", *args, "--resume-from", str(run_dir / "checkpoints" / "step-0000002"),
                        launcher=TWO_PROCESSES)
    assert "resuming from step 2" in result.stderr
    resumed = latest_checkpoint(run_dir)
    assert resumed.name == "step-0000003"
    for name in files:  # safetensors and JSON are byte-stable; .pt files hold the same tensors
        if name.endswith(".pt"):
            assert identical(read_torch(resumed / name), torch.load(io.BytesIO(straight[name]), weights_only=True)), name
        else:
            assert (resumed / name).read_bytes() == straight[name], name


def test_synchronized_batchnorm_kl_balancing_and_collective_grids(tmp_path):
    """Under torchrun (2 gloo processes): one process's share of a global batch against the whole batch."""
    out = tmp_path / "sync.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "tests" / "helpers" / "multiprocess_sync_check.py"), str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world"] == 2
    for key in ("batchnorm", "batchnorm_checkpointed"):  # outputs, gradients, running statistics
        assert all(value < 1e-5 for value in report[key].values()), (key, report[key])
    assert report["batchnorm_per_process"]["output"] > 0.1  # what synchronization fixes
    assert report["kl_gammas"] < 1e-6 and report["kl_rows"] < 1e-6 and report["noise"] == 0.0
    assert report["grid_5"] == {"rows": [0, 1, 2, 3, 4], "asked": [[[0, 3]], [[3, 5]]]}
    assert report["grid_1"]["rows"] == [0]  # rank 1 has no row: it computes row 0 and drops it


def identical(a, b) -> bool:
    """Exact equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))
    return a == b
