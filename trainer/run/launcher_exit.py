"""Exit codes and the one-line message through `accelerate launch` and `torchrun` (README, "Exit codes").

The launcher runs no code of ours: it starts our script as a child and, when the child exits non-zero, raises
(`subprocess.CalledProcessError` with one process, torch elastic's `ChildFailedError` with several), which
prints a traceback and exits 1, burying the child's `error: ...` line and its code. torch loads the entry
points of group `torch.backends` when it is imported (`torch._import_device_backends`, unless
`TORCH_DEVICE_BACKEND_AUTOLOAD=0`), and the launcher imports torch before it starts any child; `install`,
registered there in pyproject.toml, is our one foothold in the launcher. In any other process it does nothing.

In a launcher process `install` creates a private folder for exit notes, names it to the children in
`VAEBM_LAUNCHER_NOTES`, and wraps `sys.excepthook`. A child of ours that exits 2 or 3 first leaves a note
(`trainer.errors.write_launcher_note`: its pid, code and line); a child stopped by a signal leaves one with
code 0. When the launcher then fails, the hook acts only if a note matches the failure (the child's exit code
and, under torch elastic, the pid of the first failed process): it prints the child's line as the last line
(when the launcher printed anything after it) and exits with the child's code; otherwise it hands the
exception to the previous hook unchanged. With one process, Ctrl-C reaches the launcher and our script alike:
the hook waits for the script to checkpoint and exits with its code. Kept import-light: standard library only.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

NOTES_ENV = "VAEBM_LAUNCHER_NOTES"  # the same name as trainer.errors.LAUNCHER_NOTES_ENV (not imported: kept light)
SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"  # our entry points, beside the trainer package


def install() -> None:
    """The `torch.backends` entry point: in an `accelerate launch` / `torchrun` process, read our children's
    exit notes when it fails. Elsewhere (including our own training processes) it returns at once."""
    if not is_launcher(sys.argv):
        return
    folder = tempfile.mkdtemp(prefix="vaebm-launcher-")
    os.environ[NOTES_ENV] = folder
    atexit.register(shutil.rmtree, folder, True)
    sys.excepthook = _hook(Path(folder), sys.excepthook)


def is_launcher(argv: list[str]) -> bool:
    """`accelerate launch ...`, `torchrun ...`, `python -m torch.distributed.run ...` or
    `python -m accelerate.commands.launch ...`."""
    if not argv:
        return False
    program = Path(argv[0])
    if program.name == "accelerate":
        return len(argv) > 1 and argv[1] == "launch"
    return program.name == "torchrun" or program.as_posix().endswith(
        ("torch/distributed/run.py", "accelerate/commands/launch.py"))


def _hook(folder: Path, previous):
    def hook(exc_type, exc, tb) -> None:
        decision = _decide(exc, tb, folder)
        if decision is None:
            previous(exc_type, exc, tb)
            return
        code, line = decision
        sys.stdout.flush()
        if line:
            print(line, file=sys.stderr)
        sys.stderr.flush()
        shutil.rmtree(folder, ignore_errors=True)
        os._exit(code)
    return hook


def _decide(exc: BaseException, tb, folder: Path) -> tuple[int, str | None] | None:
    """(exit code, line to print last or None) when a note of ours explains `exc`; else None."""
    notes = _read_notes(folder)
    kind = type(exc).__name__
    if kind == "CalledProcessError":  # accelerate's one-process launcher; the child's line is already last
        return next(((n["code"], None) for n in notes if n["code"] == exc.returncode and n["code"]), None)
    if kind == "ChildFailedError" and hasattr(exc, "get_first_failure"):  # torch elastic: agent lines followed
        _, failure = exc.get_first_failure()
        return next(((n["code"], n["line"]) for n in notes
                     if n["pid"] == failure.pid and n["code"] == failure.exitcode and n["code"]), None)
    if kind == "SignalException":  # torch elastic forwarded SIGTERM/SIGINT; the workers checkpointed and ended
        if notes and all(n["code"] == 0 for n in notes):
            return 0, notes[0]["line"]
        return None
    if kind == "KeyboardInterrupt":  # one process: Ctrl-C reached our child too, which is checkpointing
        child = _our_child(tb)
        if child is None:
            return None
        try:
            child.wait()
        except KeyboardInterrupt:  # a second Ctrl-C: the child exits at once too
            return None
        notes = _read_notes(folder)
        return next(((n["code"], None) for n in notes if n["code"] == child.returncode), None)
    return None


def _read_notes(folder: Path) -> list[dict]:
    notes = []
    for path in sorted(folder.glob("*.json")):
        try:
            note = json.loads(path.read_text())
            notes.append({"code": int(note["code"]), "line": str(note["line"]), "pid": int(note["pid"])})
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return notes


def _our_child(tb):
    """The `subprocess.Popen` of accelerate's one-process launcher, if it runs one of our scripts."""
    while tb is not None:
        process = tb.tb_frame.f_locals.get("process")
        if hasattr(process, "wait") and hasattr(process, "args"):
            for arg in process.args or ():
                path = Path(str(arg))
                if path.suffix == ".py" and path.exists() and path.resolve().parent == SCRIPTS:
                    return process
        tb = tb.tb_next
    return None
