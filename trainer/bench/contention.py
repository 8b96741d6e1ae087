"""How the CPU thread settings hold up when the CPU is shared (README, "CPU threads").

    python scripts/bench.py contention [--settings off,1,2,1:PASSIVE,2:PASSIVE] [--quickstart] [--out table.md]

Each setting `THREADS[:POLICY]` (THREADS a number, auto or off; POLICY PASSIVE, ACTIVE or default, the
wait policy of OpenMP's idle threads; `trainer/run/threads.py`) is run twice in fresh processes: on an idle
CPU and beside one busy competitor (a process spinning on one core for the whole measurement). Measured:
`bench.py nvae` images/s (its own arguments: `--nvae-args`), and with `--quickstart` the wall time of
`scripts/quickstart.py` (its arguments: `--quickstart-args`, e.g. "--scale 0.1").
The setting "off" with the default policy (`off:default`) is PyTorch's and OpenMP's own behaviour.

Nothing here imports torch: the settings must reach each child before torch loads in it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SETTINGS = ("off:default", "1:default", "2:default", "1:PASSIVE", "2:PASSIVE", "auto:PASSIVE")


@contextlib.contextmanager
def busy_competitor(enabled: bool = True) -> Iterator[subprocess.Popen | None]:
    """One process spinning on a core for the duration of the block (a competing CPU-bound job)."""
    if not enabled:
        yield None
        return
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield competitor
    finally:
        competitor.kill()
        competitor.wait()


def setting_env(setting: str) -> dict[str, str]:
    """The environment variables of a setting `THREADS[:POLICY]` (see the module docstring)."""
    threads, _, policy = setting.partition(":")
    return {"VAEBM_THREADS": threads, "VAEBM_WAIT_POLICY": policy or "PASSIVE"}


def _child_env(setting: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update(setting_env(setting), PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    return env


def _run(command: list[str], env: dict[str, str], timeout: float) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {result.returncode}: {result.stderr.strip()[-500:]}")
    return time.perf_counter() - start, result.stdout


def measure(setting: str, busy: bool, nvae_args: str, quickstart: bool, quickstart_args: str,
            timeout: float) -> dict:
    """One row: the setting, idle or busy, the NVAE bench's img/s and (optionally) the quick start's seconds."""
    env = _child_env(setting)
    row = {"setting": setting, "load": "busy" if busy else "idle"}
    with busy_competitor(busy):
        try:
            _, out = _run([sys.executable, str(ROOT / "scripts" / "bench.py"), "nvae", *shlex.split(nvae_args)],
                          env, timeout)
            nvae = json.loads(out.strip().splitlines()[-1])
            row.update(nvae_img_per_s=nvae["img_per_s"], threads=nvae["threads"], spectral_s=nvae.get("spectral_s"))
        except (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError) as err:
            row["nvae_error"] = str(err)[-300:]
        if quickstart:
            with tempfile.TemporaryDirectory() as out_dir:
                try:
                    seconds, _ = _run([sys.executable, str(ROOT / "scripts" / "quickstart.py"), "--out", out_dir,
                                       *shlex.split(quickstart_args)], env, timeout)
                    row["quickstart_s"] = seconds
                except (RuntimeError, subprocess.TimeoutExpired) as err:
                    row["quickstart_error"] = str(err)[-300:]
    return row


def bench_contention(settings: list[str], nvae_args: str, quickstart: bool = False, quickstart_args: str = "",
                     timeout: float = 7200.0) -> dict:
    """Every setting idle and busy, in that order (each in fresh processes); returns {"rows": [...], ...}."""
    rows = [measure(setting, busy, nvae_args, quickstart, quickstart_args, timeout)
            for setting in settings for busy in (False, True)]
    return {"rows": rows, "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "nvae_args": nvae_args, "quickstart_args": quickstart_args if quickstart else None}


def markdown_table(result: dict) -> str:
    """The rows as a Markdown table, one line per setting, idle and busy side by side."""
    by_key = {(row["setting"], row["load"]): row for row in result["rows"]}
    settings = list(dict.fromkeys(row["setting"] for row in result["rows"]))
    quickstart = result.get("quickstart_args") is not None

    def cell(row: dict, key: str, digits: int) -> str:
        return f"{row[key]:.{digits}f}" if key in row else "error"

    header = "| setting (threads:wait policy) | NVAE img/s idle | NVAE img/s busy |"
    header += " quick start idle | quick start busy |" if quickstart else ""
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for setting in settings:
        idle, busy = by_key[(setting, "idle")], by_key[(setting, "busy")]
        line = f"| `{setting}` | {cell(idle, 'nvae_img_per_s', 2)} | {cell(busy, 'nvae_img_per_s', 2)} |"
        if quickstart:
            line += f" {cell(idle, 'quickstart_s', 0)} s | {cell(busy, 'quickstart_s', 0)} s |"
        lines.append(line)
    return "\n".join(lines) + "\n"
