"""Run monitoring: log.txt, stats.jsonl, TensorBoard scalars and image grids, and the same scalars and grids
to the trackers of `train.log_with` (trainer/run/trackers.py). Main process only.

On resume from step S, rows of stats.jsonl after S (written by the interrupted run after its last
checkpoint) are dropped and TensorBoard purges its events after S, so every curve is continuous.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from models.files import atomic_write_text
from trainer.run.images import make_grid, save_png, to_uint8
from trainer.run.trackers import log_image, log_scalars, start_trackers


class RunMonitor:
    """log.txt, stats.jsonl, TensorBoard and trackers of one run; everything is a no-op where not enabled."""

    def __init__(self, run_dir: Path, *, enabled: bool, resume_step: int = 0, accelerator=None,
                 project: str = "vaebm-trainer"):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.tb = None
        self.trackers: list = []
        if not enabled:
            return
        self.stats_path = self.run_dir / "stats.jsonl"
        if resume_step and self.stats_path.exists():
            self._truncate_stats(resume_step)
        self.log_file = open(self.run_dir / "log.txt", "a", buffering=1)
        from torch.utils.tensorboard import SummaryWriter  # heavy import, main process only

        self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None,
                                flush_secs=30)
        if accelerator is not None and accelerator.log_with:  # `train.log_with` beyond TensorBoard
            self.trackers = start_trackers(accelerator, self.run_dir, project)

    def _truncate_stats(self, resume_step: int) -> None:
        kept = []
        for line in self.stats_path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= resume_step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a row cut short by a crash
        atomic_write_text(self.stats_path, "".join(f"{line}\n" for line in kept))

    def log(self, message: str) -> None:
        """A line to stdout and log.txt, with a timestamp in the file."""
        if not self.enabled:
            return
        print(message, file=sys.stderr, flush=True)
        self.log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    def stats(self, step: int, row: dict[str, float], tb_tags: dict[str, str] | None = None) -> None:
        """One row of stats.jsonl and one TensorBoard (and tracker) scalar per value (tag from `tb_tags` or
        `train/<key>`)."""
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in row.items()}}
        with open(self.stats_path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        scalars = {(tb_tags or {}).get(key, f"train/{key}"): value for key, value in row.items()
                   if key != "step" and isinstance(value, (int, float))}
        for tag, value in scalars.items():
            self.tb.add_scalar(tag, value, step)
        log_scalars(self.trackers, scalars, step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Scalars under their full tags (e.g. `kl/group_03`) to TensorBoard and the trackers, not stats.jsonl."""
        if self.enabled:
            values = {tag: _plain(value) for tag, value in values.items()}
            for tag, value in values.items():
                self.tb.add_scalar(tag, value, step)
            log_scalars(self.trackers, values, step)

    def images(self, tag: str, images: torch.Tensor, step: int, ncol: int) -> None:
        """A grid of [-1, 1] images to TensorBoard, samples/<tag>-<step>.png and the trackers."""
        if not self.enabled:
            return
        grid = make_grid(to_uint8(images), ncol)
        self.tb.add_image(tag, grid, step, dataformats="CHW")
        png = self.run_dir / "samples" / f"{tag.replace('/', '_')}-{step:07d}.png"
        save_png(grid, png)
        if self.trackers:
            log_image(self.trackers, tag, grid.permute(1, 2, 0).numpy(), png, step)

    def close(self) -> None:
        """Close TensorBoard and log.txt (main process)."""
        if self.enabled:
            self.tb.close()  # the trackers are finished by `accelerator.end_training()`
            self.log_file.close()


def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.item()
    return value


class Progress:
    """The progress bar (main process) and the throughput window between two log rows.

    `skipped_updates` counts, over this process's life, the optimizer updates skipped for non-finite values.
    """

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=not enabled)
        self.images, self.since, self.skipped_updates = 0, time.perf_counter(), 0

    def step_done(self, images: int) -> None:
        """One optimizer step over `images` images (all processes together)."""
        self.images += images
        self.bar.update(1)

    def images_per_second(self) -> float:
        """Throughput since the last `new_window`."""
        return self.images / max(time.perf_counter() - self.since, 1e-9)

    def new_window(self, **postfix: str) -> None:
        """Start the next throughput window; show `postfix` beside the bar."""
        self.bar.set_postfix(**postfix)
        self.images, self.since = 0, time.perf_counter()

    def close(self) -> None:
        """Close the progress bar."""
        self.bar.close()


def parameter_count(net: torch.nn.Module) -> str:
    """`12.34 M parameters`, for the start-of-run line."""
    return f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters"
