"""Shared fixtures: a bundled-data cache and a tiny trained NVAE run, made once per test session."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.run.host_memory import keep_freed_host_memory

ROOT = Path(__file__).resolve().parents[1]

# In-process tests reuse freed host memory as the scripts do (their subprocesses apply it themselves).
keep_freed_host_memory()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now. Two-process launches name one (Accelerate's default is 29500 for all),
    so tests running side by side (`pytest -n 2`) never meet on a port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Small settings every end-to-end trainer test shares (a few seconds per step on 2 CPU cores).
FAST = ["train.per_device_batch_size=8", "train.global_batch_size=8", "data.num_workers=1",
        "train.progress_bar=false", "train.log_every=2"]


def run_script(script: str, *args: str, launcher: list[str] | None = None, timeout: int = 600,
               check: bool = True) -> subprocess.CompletedProcess:
    """Run `scripts/<script>` in a subprocess with one torch thread; fail with its output if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = (launcher or [sys.executable]) + [str(ROOT / "scripts" / script), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's in-process tests (as run_script gives subprocesses), restored after:
    OpenMP spin-waiting makes 2 threads many times slower than 1 for tiny tensors on a shared 2-core box."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Where bundled datasets materialize their shards during the tests (never the user's cache)."""
    return tmp_path_factory.mktemp("bundled-cache")


@pytest.fixture(scope="session")
def nvae_run(tmp_path_factory, cache_dir) -> Path:
    """A tiny NVAE trained for 4 steps on digits: enough to be a frozen VAE for the VAEBM tests."""
    run_dir = tmp_path_factory.mktemp("nvae") / "run"
    run_script("train_nvae.py", "--config", "digits", "--run-dir", str(run_dir), "train.max_steps=4",
               f"data.cache_dir={cache_dir}", *FAST)
    return run_dir
