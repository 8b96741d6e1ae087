"""Summarize a sweep (slurm/sweep.sbatch): one row per task, its overrides and final metrics.

    python scripts/sweep_summary.py runs/sweep-1234 [--out summary.md | summary.csv]

Reads SWEEP_DIR/task-*/sweep_overrides.txt and the last row of each task's stats.jsonl; the status
column says finished / halted / diverged / running (no final line yet) / error (unreadable task,
reported, not fatal). Prints Markdown; --out writes Markdown, or CSV when the name ends in .csv.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from pathlib import Path

# Shown first when present (NVAE, then VAEBM); any other metric follows in alphabetical order.
PREFERRED = ["step", "loss", "nelbo", "recon", "kl", "energy_pos", "energy_neg", "energy_gap", "lr"]


def task_row(task_dir: Path) -> dict:
    """One task's summary: task id, overrides, status, final metrics. Never raises for a bad task."""
    row: dict = {"task": task_dir.name.removeprefix("task-")}
    try:
        overrides = task_dir / "sweep_overrides.txt"
        row["overrides"] = overrides.read_text().strip() if overrides.is_file() else "?"
        row["status"] = _status(task_dir)
        stats = task_dir / "stats.jsonl"
        lines = stats.read_text().splitlines() if stats.is_file() else []
        last = next((line for line in reversed(lines) if line.strip()), None)
        if last is None:
            return row
        for key, value in json.loads(last).items():
            row[key] = value
    except (OSError, ValueError, UnicodeDecodeError) as err:
        row["status"] = f"error: {err}"
    return row


def _status(task_dir: Path) -> str:
    if (task_dir / "DIVERGED.json").is_file():
        return "diverged"
    log = task_dir / "log.txt"
    if not log.is_file():
        return "not started"
    tail = log.read_text(errors="replace").rstrip().splitlines()[-1:] or [""]
    if "finished at step" in tail[0]:
        return "finished"
    if "halted at step" in tail[0]:
        return "halted"
    return "running"


def collect(sweep_dir: Path) -> list[dict]:
    """One row per task-N directory of a sweep, in task order."""
    tasks = [p for p in sweep_dir.iterdir() if p.is_dir() and re.fullmatch(r"task-\d+", p.name)]
    return [task_row(p) for p in sorted(tasks, key=lambda p: int(p.name.split("-")[1]))]


def columns(rows: list[dict]) -> list[str]:
    """Table columns: task, overrides, status, then the preferred metrics, then the rest sorted."""
    metrics = {key for row in rows for key in row} - {"task", "overrides", "status"}
    return ["task", "overrides", "status"] + [k for k in PREFERRED if k in metrics] \
        + sorted(metrics - set(PREFERRED))


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    cols = columns(rows)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        out.append("| " + " | ".join(_cell(row.get(c)).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(out) + "\n"


def to_csv(rows: list[dict]) -> str:
    """The rows as CSV text."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns(rows), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in row.items()})
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    """Print a sweep's summary table (and write it with --out); 2 if the sweep has no tasks."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="the sweep's directory (holds task-0, task-1, ...)")
    parser.add_argument("--out", type=Path, default=None, help="write here (.csv: CSV, else Markdown)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: sweep directory '{args.sweep_dir}' does not exist", file=sys.stderr)
        return 2
    rows = collect(args.sweep_dir)
    if not rows:
        print(f"error: no task-N directories in '{args.sweep_dir}'", file=sys.stderr)
        return 2
    table = markdown(rows)
    print(table, end="")
    if args.out is not None:
        args.out.write_text(to_csv(rows) if args.out.suffix.lower() == ".csv" else table)
    for row in rows:
        if str(row.get("status", "")).startswith("error"):
            print(f"warning: task {row['task']}: {row['status']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
