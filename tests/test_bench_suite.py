"""The benchmark commands that only run when someone measures: `bench.py gpu-suite --tiny` (so the GPU suite
cannot rot), its isolation of failing parts and its time budget, `bench.py contention`, and what `bench.py nvae`
reports (spectral_s, threads, busy). Functional checks only: no figure is compared with a speed."""
from __future__ import annotations

import json
import math
import time

import pytest
from conftest import run_script

from trainer.bench.gpu_parts import largest_batch
from trainer.bench.gpu_suite import BUDGETS


def _json(result) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_largest_batch_search():
    probes = []

    def fits_below(threshold):
        def fits(batch: int) -> bool:
            probes.append(batch)
            return batch <= threshold
        return fits

    far = time.monotonic() + 60
    batch, exact = largest_batch(fits_below(37), 64, far)
    assert exact and 37 - 37 // 8 <= batch <= 37 and len(probes) <= 12
    assert largest_batch(fits_below(1000), 64, far) == (64, False)  # capped: a lower bound
    assert largest_batch(fits_below(0), 64, far) == (0, True)  # not even one image fits
    assert largest_batch(fits_below(1000), 64, time.monotonic() - 1) == (0, False)  # no time left


@pytest.mark.slow
def test_gpu_suite_tiny_runs_every_part(tmp_path):
    out = tmp_path / "suite"
    result = _json(run_script("bench.py", "gpu-suite", "--out", str(out), "--tiny", timeout=1200))
    assert list(result["parts"]) == list(BUDGETS)
    for name, figures in result["parts"].items():
        assert "error" not in figures, (name, figures["error"])
    parts = result["parts"]
    for prefix in ("no_checkpointing_", "checkpointing_"):
        assert parts["nvae-batch"][f"{prefix}largest_batch"] == 4  # the tiny cap: nothing runs out of memory
        assert parts["nvae-batch"][f"{prefix}img_per_s"] > 0
    assert parts["vaebm"]["batch4_step_s"] > 0 and parts["vaebm"]["largest_batch"] == 4
    assert parts["sample"]["images"] == 4 and parts["sample"]["seconds"] > 0
    assert 0 < parts["precision"]["relative_difference"] < 1e-2  # bf16 ran, and stayed close
    assert parts["deepspeed"]["steps"] == 3 and parts["deepspeed"]["losses_finite"] is True
    assert parts["compile"]["eager_img_per_s"] > 0 and parts["compile"]["compiled_img_per_s"] > 0
    assert json.loads((out / "gpu_suite.json").read_text()) == result
    table = (out / "gpu_suite.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "measurement" not in line]
    assert len(rows) == 10 and not any("–" in row for row in rows)
    assert "Errors" not in table


@pytest.mark.slow
def test_gpu_suite_records_a_failing_part_and_goes_on(tmp_path):
    out = tmp_path / "suite"
    (out / "parts" / "precision.json").mkdir(parents=True)  # the precision part cannot write its figures
    result = _json(run_script("bench.py", "gpu-suite", "--out", str(out), "--tiny", "--parts", "precision,sample",
                              timeout=600))
    assert "error" in result["parts"]["precision"]
    assert "error" not in result["parts"]["sample"] and result["parts"]["sample"]["seconds"] > 0
    assert "- `precision`:" in (out / "gpu_suite.md").read_text()


def test_gpu_suite_stops_at_its_budget(tmp_path):
    result = _json(run_script("bench.py", "gpu-suite", "--out", str(tmp_path), "--tiny", "--budget-s", "3"))
    assert all(figures["error"].startswith("skipped") for figures in result["parts"].values())


def test_gpu_suite_refuses_unknown_parts(tmp_path):
    result = run_script("bench.py", "gpu-suite", "--out", str(tmp_path), "--parts", "nvae-batch,warp", check=False)
    assert result.returncode == 2 and "unknown gpu-suite part(s) warp" in result.stderr


@pytest.mark.slow
def test_nvae_bench_reports_spectral_time_threads_and_load():
    result = _json(run_script("bench.py", "nvae", "--config", "digits", "--batch-size", "2", "--steps", "2",
                              "--warmup", "1", "--threads", "1", "--busy"))
    assert 0 < result["spectral_s"] < result["step_s"] and math.isfinite(result["spectral_s"])
    assert result["step_s_min"] <= result["step_s_median"] <= 2 * result["step_s"]
    assert result["threads"] == 1 and result["busy"] is True and result["wait_policy"] == "PASSIVE"


@pytest.mark.slow
def test_contention_runs_each_setting_idle_and_busy(tmp_path):
    table = tmp_path / "table.md"
    result = _json(run_script("bench.py", "contention", "--settings", "1:PASSIVE,2:default", "--nvae-args",
                              "--config digits --batch-size 2 --steps 1 --warmup 0", "--out", str(table),
                              timeout=1200))
    rows = result["rows"]
    assert [(r["setting"], r["load"]) for r in rows] == [("1:PASSIVE", "idle"), ("1:PASSIVE", "busy"),
                                                         ("2:default", "idle"), ("2:default", "busy")]
    assert all(r["nvae_img_per_s"] > 0 and r["spectral_s"] > 0 for r in rows)
    assert [r["threads"] for r in rows] == [1, 1, 2, 2]
    lines = table.read_text().splitlines()
    assert len(lines) == 4 and lines[2].startswith("| `1:PASSIVE` |") and "error" not in table.read_text()
