"""scripts/make_shards.py run as a user would: exit codes, one-line errors, nothing left behind."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.shards import read_index

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "make_shards.py"


def run_cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def _save_png(path: Path, width: int, height: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(width * height).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def test_digits_dataset(tmp_path):
    result = run_cli("--dataset", "digits", "--size", "8", "--count", "300", "--output", tmp_path / "d")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("wrote 3 shards, 300 samples, skipped 0")
    index = read_index(tmp_path / "d", verify_sha256=True)
    assert index["num_samples"] == 300 and index["has_labels"]


def test_folder_with_a_broken_image_reports_the_skip(tmp_path):
    for i in range(3):
        _save_png(tmp_path / "in" / f"a{i}.png", 20, 24)
    (tmp_path / "in" / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    result = run_cli("--input", tmp_path / "in", "--output", tmp_path / "out", "--size", "16", "--quality", "90")
    assert result.returncode == 0, result.stderr
    assert "3 samples, skipped 1" in result.stdout
    assert read_index(tmp_path / "out")["format"] == "jpg"


def _make_bad_case(case: str, tmp_path: Path) -> tuple[list, Path, str]:
    """Build the input for one failure case; return (extra args, output dir, text the error names)."""
    out = tmp_path / "out"
    source = tmp_path / "in"
    if case == "missing_input":
        return ["--input", source], out, str(source)
    source.mkdir()
    if case == "empty_folder":
        return ["--input", source], out, "no image files"
    if case == "only_non_images":
        (source / "readme.txt").write_text("hello")
        (source / "data.csv").write_text("1,2")
        return ["--input", source], out, "no image files"
    if case == "only_small_images":  # a small image among usable ones is skipped (tests/test_own_images.py)
        for i in range(2):
            _save_png(source / f"small{i}.png", 50, 12)
        return ["--input", source, "--samples-per-shard", "2"], out, "no usable images"
    if case == "output_under_a_file":
        _save_png(source / "ok.png", 40, 40)
        (tmp_path / "afile").write_text("x")
        return ["--input", source], tmp_path / "afile" / "out", str(tmp_path / "afile")
    if case == "existing_index":
        _save_png(source / "ok.png", 40, 40)
        out.mkdir()
        (out / "index.json").write_text("{}")
        return ["--input", source], out, "--overwrite"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing_input", "empty_folder", "only_non_images", "only_small_images",
                                  "output_under_a_file", "existing_index"])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case, tmp_path):
    args, out, named = _make_bad_case(case, tmp_path)
    before = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    result = run_cli(*args, "--output", out, "--size", "16")
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert named in lines[0]
    after = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    assert after == before  # nothing written (or, for an existing set, nothing changed)


def test_an_image_over_the_pixel_limit_is_skipped_unread(tmp_path):
    """A 12,000 × 12,000 PNG of 140 KB would decode to gigabytes: skipped and counted like an undecodable file,
    judged from its header; --max-pixels moves the limit."""
    for i in range(3):
        _save_png(tmp_path / "in" / f"{i}.png", 20, 20)
    _save_png(tmp_path / "in" / "larger.png", 30, 30)
    buffer = io.BytesIO()
    Image.new("L", (12000, 12000), 0).save(buffer, "PNG", optimize=True)
    (tmp_path / "in" / "bomb.png").write_bytes(buffer.getvalue())
    result = run_cli("--input", tmp_path / "in", "--output", tmp_path / "out", "--size", "16")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("wrote 1 shards, 4 samples, skipped 1")
    assert "DecompressionBomb" not in result.stderr  # judged by our limit, from the header
    smaller = run_cli("--input", tmp_path / "in", "--output", tmp_path / "out2", "--size", "16", "--max-pixels", "500")
    assert smaller.returncode == 0 and "3 samples, skipped 2" in smaller.stdout, smaller.stderr  # 30 × 30 > 500
