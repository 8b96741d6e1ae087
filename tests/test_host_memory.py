"""Keeping freed host memory for reuse (trainer/run/host_memory.py): a script's NVAE training steps reuse the
memory the step before freed, where glibc's defaults fault much of it back in; the knob, the user's own malloc
settings and bad values."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from trainer.errors import UserError
from trainer.run.host_memory import is_glibc, keep_freed_host_memory, malloc_setting


def _huge_pages_always() -> bool:
    """Transparent huge pages for all memory: one fault then maps 2 MiB, and fault counts say little."""
    try:
        return "[always]" in open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return False


def _bench_page_faults(malloc: str) -> float:
    """Minor page faults per NVAE training step (`bench.py nvae`, whose `run_cli` applies the setting) after
    3 warm-up steps: the heap has reached its peak by then."""
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD"))}
    env.update(VAEBM_MALLOC=malloc, PYTHONPATH=str(ROOT))
    command = [sys.executable, str(ROOT / "scripts" / "bench.py"), "nvae", "--config", "nvae-bench-small",
               "--batch-size", "8", "--steps", "3", "--warmup", "3", "--threads", "1"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["malloc"] == malloc  # what the script applied
    return report["page_faults_per_step"]


@pytest.mark.skipif(not is_glibc(), reason="the setting is glibc's malloc's")
@pytest.mark.skipif(_huge_pages_always(), reason="transparent huge pages 'always': faults count 2 MiB at a time")
def test_training_steps_reuse_freed_memory_instead_of_faulting_it_back_in():
    # Measured (README, "Host memory"): 8,000-68,000 faults per step with glibc's defaults, 1-900 kept.
    kept = _bench_page_faults("keep")
    default = _bench_page_faults("default")
    assert kept < 2000
    assert default > 3000, "glibc's defaults no longer re-fault a step's memory: this test would not see a failure"


def test_the_knob_the_users_own_malloc_settings_and_other_allocators():
    assert keep_freed_host_memory({"VAEBM_MALLOC": "default"}) == "default"
    assert keep_freed_host_memory({"MALLOC_TRIM_THRESHOLD_": "1000000"}) == "user"
    assert keep_freed_host_memory({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}) == "user"
    assert keep_freed_host_memory({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) == "preloaded"
    expected = "keep" if is_glibc() else "unsupported"
    assert malloc_setting({}) == keep_freed_host_memory({}) == expected


def test_a_bad_value_names_the_variable():
    with pytest.raises(UserError, match="VAEBM_MALLOC must be one of keep, default, got 'always'"):
        keep_freed_host_memory({"VAEBM_MALLOC": "always"})
