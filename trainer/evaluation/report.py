"""Where an experiment's results go: JSON (atomic), a printed table, TensorBoard, and a work folder.

    report = ExperimentReport("modes", out=Path("modes.json"), run_dir=Path("runs/eval/modes"))
    report.log("training NVAE ...")        # stderr (and run_dir/log.txt)
    report.image("samples/nvae", grid)     # PNG in run_dir and a TensorBoard image
    report.finish(results)                 # JSON to --out, scalars to TensorBoard, table to stdout

Without --run-dir, intermediate trainings go to a temporary folder that is removed at the end.
"""
from __future__ import annotations

import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from models.files import atomic_write_json


class ExperimentReport:
    """One experiment's log, images, TensorBoard and JSON result, in a run directory (temporary if none given)."""

    def __init__(self, name: str, out: Path | None, run_dir: Path | None):
        self.name, self.out = name, out
        self._temporary = run_dir is None
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"eval-{name}-")) if run_dir is None else Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._tb = None
        self._started = time.perf_counter()

    @property
    def keep_files(self) -> bool:
        """True when a --run-dir was given (images and trained runs are kept there)."""
        return not self._temporary

    def work_dir(self, name: str) -> Path:
        """A sub-folder of the run directory for one trained model or intermediate artefact."""
        path = self.run_dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def log(self, message: str) -> None:
        """A timestamped line to stderr (and to log.txt when the run directory is kept)."""
        line = f"[{self.name} {time.perf_counter() - self._started:6.0f}s] {message}"
        print(line, file=sys.stderr, flush=True)
        if self.keep_files:
            with open(self.run_dir / "log.txt", "a") as handle:
                handle.write(line + "\n")

    def tensorboard(self):
        """The experiment's SummaryWriter (under run_dir/tb), or None without --run-dir."""
        if self._tb is None and self.keep_files:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tb"))
        return self._tb

    def image(self, tag: str, images: torch.Tensor, ncol: int = 8, value_range=(-1.0, 1.0)) -> Path | None:
        """Save a grid of images [N, C, H, W] (in `value_range`) as run_dir/<tag>.png and to TensorBoard."""
        if not self.keep_files:
            return None
        from trainer.run.images import make_grid, save_png, to_uint8

        low, high = value_range
        scaled = (images.detach().float().cpu() - low) / (high - low) * 2 - 1  # to_uint8 expects [-1, 1]
        grid = make_grid(to_uint8(scaled), ncol=ncol)
        path = self.run_dir / f"{tag.replace('/', '_')}.png"
        save_png(grid, path)
        if self.tensorboard() is not None:
            self._tb.add_image(f"{self.name}/{tag}", grid, 0)
        return path

    def scatter(self, tag: str, points: torch.Tensor, extent: float, size: int = 256) -> Path | None:
        """Save 2-D points [N, 2] as a density image (log-scaled 2-D histogram over [−extent, extent]²)."""
        if not self.keep_files:
            return None
        image = density_image(points, extent, size)
        return self.image(tag, image[None], ncol=1, value_range=(0.0, 1.0))


    def finish(self, results: dict) -> dict:
        """Write the JSON (atomically), the TensorBoard scalars and the printed table; clean up."""
        results = {"experiment": self.name, **results, "seconds": round(time.perf_counter() - self._started, 1)}
        if self.out is not None:
            write_json_atomic(self.out, results)
        if self.tensorboard() is not None:
            for key, value in results.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self._tb.add_scalar(f"{self.name}/{key}", value, 0)
            self._tb.close()
        print(format_table(results))
        if self._temporary:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return results


def density_image(points: torch.Tensor, extent: float, size: int) -> torch.Tensor:
    """[N, 2] points → a [1, size, size] image in [0, 1]: white background, darker where points are dense."""
    points = points.detach().float().cpu()
    cells = ((points + extent) / (2 * extent) * size).long()
    inside = ((cells >= 0) & (cells < size)).all(dim=1)
    cells = cells[inside]
    counts = torch.zeros(size * size)
    counts.index_add_(0, (size - 1 - cells[:, 1]) * size + cells[:, 0], torch.ones(len(cells)))  # y up
    shade = torch.log1p(counts) / max(float(torch.log1p(counts).max()), 1e-9)
    return (1.0 - shade).reshape(1, size, size)


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write the results as strict JSON, atomically: never a half-written result. A non-finite number (an
    estimate that failed) is written as null, which the tables show as "–"."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, _finite_or_null(payload), indent=2, sort_keys=False)


def _finite_or_null(value):
    """`value` with every non-finite float replaced by None, recursively through dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    return value


def format_table(results: dict) -> str:
    """A two-column text table of the scalar results (lists are summarized by their length)."""
    rows = []
    for key, value in results.items():
        if isinstance(value, float):
            shown = f"{value:.4g}"
        elif isinstance(value, (list, tuple)):
            shown = f"[{len(value)} values]"
        else:
            shown = str(value)
        rows.append((key, shown))
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {shown}" for key, shown in rows)
