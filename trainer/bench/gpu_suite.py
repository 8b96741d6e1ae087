"""One command for a GPU: the figures README, "Benchmarks" awaits, in one run of at most 8 minutes.

    python scripts/bench.py gpu-suite --out DIR [--parts nvae-batch,vaebm,...] [--budget-s 480]
    python scripts/bench.py gpu-suite --out DIR --tiny          # tiny configs on any device, in seconds

The parts (NVAE `celebahq256` largest batch and img/s with and without gradient checkpointing, VAEBM
iterations, sampling against the paper's time, bf16 against fp32, DeepSpeed ZeRO-2, `torch.compile`) are in
`trainer/bench/gpu_parts.py`; this module runs them and writes the table.

Every part runs in its own process with its own time budget (`BUDGETS`, scaled to `--budget-s`), so an
out-of-memory or a crash in one part cannot disturb the next: a part that fails or runs out of time
records its error, the others go on. Parts write their figures as they get them (`DIR/parts/NAME.json`),
so a part stopped by its budget keeps what it measured. The suite writes `DIR/gpu_suite.json` and
`DIR/gpu_suite.md` (one table). The test suite runs it with `--tiny`, so it cannot rot unnoticed.
"""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

from trainer.bench.gpu_parts import PAPER_SAMPLE_SECONDS, PARTS, ROOT, PartContext

BUDGETS = {"nvae-batch": 150, "vaebm": 90, "sample": 45, "precision": 30, "deepspeed": 75, "compile": 90}  # s


# ----------------------------------------------------------------------------------------------
# The orchestrator.


def run_suite(out: Path, tiny: bool, parts: list[str], budget_s: float) -> dict:
    """Run `parts` one after the other, each in its own process; write gpu_suite.json and gpu_suite.md."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "parts").mkdir(exist_ok=True)
    scale = budget_s / sum(BUDGETS.values())
    suite_deadline = time.monotonic() + budget_s
    results = {"tiny": tiny, "budget_s": budget_s, "parts": {}}
    for name in parts:
        budget = min(BUDGETS[name] * scale, suite_deadline - time.monotonic())
        if budget < 5:
            results["parts"][name] = {"error": "skipped: the suite's time budget is spent"}
            continue
        try:
            results["parts"][name] = run_part_process(name, out, tiny, budget)
        except Exception as err:  # the suite itself must survive anything a part leaves behind
            results["parts"][name] = {"error": f"{type(err).__name__}: {err}"}
    results["environment"] = environment()
    (out / "gpu_suite.json").write_text(json.dumps(results, indent=1))
    (out / "gpu_suite.md").write_text(markdown(results))
    return results


def run_part_process(name: str, out: Path, tiny: bool, budget: float) -> dict:
    """One part in a child process, killed `GRACE` s after its budget; its figures, plus `error` and `seconds`."""
    command = [sys.executable, str(ROOT / "scripts" / "bench.py"), "gpu-suite", "--out", str(out), "--part", name,
               "--budget-s", f"{budget:.1f}"] + (["--tiny"] if tiny else [])
    part_file = out / "parts" / f"{name}.json"
    with contextlib.suppress(OSError):  # figures of an earlier run
        part_file.unlink(missing_ok=True)
    start = time.monotonic()
    error = None
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=budget + 30, cwd=ROOT)
        if result.returncode != 0:
            error = f"exit {result.returncode}: {result.stderr.strip()[-800:]}"
    except subprocess.TimeoutExpired:
        error = f"stopped after its budget of {budget:.0f} s"
    figures = json.loads(part_file.read_text()) if part_file.is_file() else {}
    return {**figures, "seconds": round(time.monotonic() - start, 1), **({"error": error} if error else {})}


def run_part(name: str, out: Path, tiny: bool, budget: float) -> dict:
    """Run one part in this process (what `run_part_process` starts); returns its figures."""
    import torch

    from trainer.errors import UserError

    if not tiny and not torch.cuda.is_available():
        raise UserError("gpu-suite measures a GPU and none is visible; --tiny runs it anywhere")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    context = PartContext(tiny, device, time.monotonic() + budget - 5, out / "parts" / f"{name}.json",
                          {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"})
    context.record()
    PARTS[name](context)
    return context.figures


def environment() -> dict:
    """Versions of torch, CUDA, Accelerate and DeepSpeed, and the GPU's name."""
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import accelerate
        import deepspeed

        info.update(accelerate=accelerate.__version__, deepspeed=deepspeed.__version__)
    except ImportError as err:
        info["import_error"] = str(err)
    return info


# ----------------------------------------------------------------------------------------------
# The table.


def markdown(results: dict) -> str:
    """One Markdown table: a line per figure (– where a part did not get it), then the parts' errors."""
    parts, env = results["parts"], results.get("environment", {})

    def get(part: str, key: str, unit: str = "", digits: int = 3):
        value = parts.get(part, {}).get(key)
        if value is None:
            return "–"
        if key == "mixed_precision":
            return {"no": "fp32", "auto": "fp32"}.get(value, value)
        return f"{value:.{digits}g}{unit}" if isinstance(value, float) else f"{value}{unit}"

    def batch(part: str, prefix: str) -> str:
        exact = parts.get(part, {}).get(f"{prefix}largest_batch_exact")
        return ("" if exact in (True, None) else "≥ ") + get(part, f"{prefix}largest_batch")

    nvae = f"NVAE {get('nvae-batch', 'config')} {get('nvae-batch', 'mixed_precision')}"
    rows = [
        (f"{nvae}, largest batch per GPU", batch("nvae-batch", "no_checkpointing_")),
        (f"{nvae}, img/s and peak memory at it", f"{get('nvae-batch', 'no_checkpointing_img_per_s')} img/s, "
                                                f"{get('nvae-batch', 'no_checkpointing_peak_mem_mb', ' MB', 5)}"),
        (f"{nvae} with gradient checkpointing, largest batch", batch("nvae-batch", "checkpointing_")),
        (f"{nvae} with gradient checkpointing, img/s and peak memory",
         f"{get('nvae-batch', 'checkpointing_img_per_s')} img/s, "
         f"{get('nvae-batch', 'checkpointing_peak_mem_mb', ' MB', 5)}"),
        (f"VAEBM {get('vaebm', 'config')} ({get('vaebm', 'mixed_precision')}, {get('vaebm', 'langevin_steps')} "
         f"Langevin steps), iteration at batch 4", f"{get('vaebm', 'batch4_step_s', ' s')}, "
                                                  f"{get('vaebm', 'batch4_peak_mem_mb', ' MB', 5)}"),
        (f"VAEBM {get('vaebm', 'config')}, largest batch and its iteration",
         f"{batch('vaebm', '')}: {get('vaebm', 'largest_batch_step_s', ' s')}, "
         f"{get('vaebm', 'largest_batch_peak_mem_mb', ' MB', 5)}"),
        (f"Sampling {get('sample', 'images')} images, {get('sample', 'langevin_steps')} Langevin steps, "
         f"{get('sample', 'config')} (paper: {PAPER_SAMPLE_SECONDS} s on a Titan RTX)", get("sample", "seconds", " s")),
        (f"NVAE {get('precision', 'config')} loss of one batch, bf16 vs fp32",
         f"{get('precision', 'bf16_loss', '', 7)} vs {get('precision', 'fp32_loss', '', 7)} "
         f"(relative {get('precision', 'relative_difference')})"),
        (f"DeepSpeed ZeRO-2, one process, {get('deepspeed', 'config')} {get('deepspeed', 'mixed_precision')}",
         f"{get('deepspeed', 'steps')} steps, losses finite: {get('deepspeed', 'losses_finite')}, "
         f"{get('deepspeed', 'img_per_s')} img/s"),
        (f"torch.compile ({get('compile', 'backend')}), NVAE {get('compile', 'config')} batch "
         f"{get('compile', 'batch')}, img/s off → on", f"{get('compile', 'eager_img_per_s')} → "
                                                      f"{get('compile', 'compiled_img_per_s')} "
                                                      f"(×{get('compile', 'speedup')})"),
    ]
    lines = [f"GPU suite{' (--tiny)' if results['tiny'] else ''}: {env.get('gpu') or 'no GPU'}, torch "
             f"{env.get('torch')}, CUDA {env.get('cuda')}, budget {results['budget_s']:.0f} s.", "",
             "| measurement | result |", "|---|---|", *[f"| {label} | {value} |" for label, value in rows]]
    errors = [f"- `{name}`: {figures['error']}" for name, figures in parts.items() if "error" in figures]
    if errors:
        lines += ["", "Errors:", *errors]
    return "\n".join(lines) + "\n"
