"""User-facing errors and exit codes: one line, no traceback.

Library code raises `UserError` for mistakes a user can fix (a missing file, a bad config key, a bad value, a
run directory held by another training, a full disk) and `TrainingDiverged` when a training run diverged.
Entry points wrap `main` in `trainer.cli.run_cli`, which prints the message on one line to stderr and exits
with the code below (README, "Exit codes"). Bugs (any other exception) still surface with a full traceback
(exit 1). This module is the bottom of the import graph: it imports nothing from the project.

    0  finished, or stopped cleanly (STOP file, SIGTERM/SIGINT/SIGUSR1, train.halt_at_step)
    1  a crash: a bug or a failure of the machine, with its traceback
    2  bad input: a one-line `error: ...` (config, files, a held run directory, no space left on a device)
    3  training diverged: a one-line `error: training diverged ...`; the run is marked and not resumed into
    4  an evaluation stopped before its results: a training inside it was stopped (a stop signal, a STOP file);
       that training checkpointed, no result was written, and the same command resumes it

Under `accelerate launch` and `torchrun` the launcher itself would exit 1 with its own traceback; a child
leaves a note (`write_launcher_note`) that `trainer/run/launcher_exit.py` turns into the child's code and line.
"""
from __future__ import annotations

import errno
import json
import os


NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # a full device or quota
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_STOPPED = 4
MAX_LINE = 1000  # characters of one error line; longer messages are cut (a config value may be huge)
# Set by trainer/run/launcher_exit.py in a launcher process: where its children leave their exit notes.
LAUNCHER_NOTES_ENV = "VAEBM_LAUNCHER_NOTES"


class UserError(Exception):
    """A mistake in the user's input: reported as one line, exit code 2."""


class TrainingDiverged(Exception):
    """A training run diverged (it is marked and its checkpoints from the bad streak dropped): exit code 3."""


class TrainingStopped(Exception):
    """A training that a larger command needs finished (an evaluation's model) was stopped on request before its
    last step: the command ends without results, exit code 4. A training on its own that stops exits 0 instead
    (its run directory says how it ended); an evaluation must not go on to score a half-trained model."""


def one_line(message: str, limit: int = MAX_LINE) -> str:
    """`message` on one line (whitespace runs collapsed), at most `limit` characters."""
    line = " ".join(str(message).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def short_repr(value, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters: error messages quote values of any size."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def no_space_path(err: BaseException) -> str | None:
    """For an error caused by a full device (ENOSPC, EDQUOT, anywhere in its cause chain), the path it names
    ("" when none); None for any other error."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in NO_SPACE_ERRNOS:
            return str(err.filename or "")
        err = err.__cause__ or err.__context__
    return None


def write_launcher_note(code: int, line: str) -> None:
    """Under a launcher that reads notes (`trainer/run/launcher_exit.py`): leave this process's exit code and
    line for it, so the launcher exits with the same code and prints the line last."""
    folder = os.environ.get(LAUNCHER_NOTES_ENV)
    if not folder or not os.path.isdir(folder):
        return
    note = {"code": code, "line": line, "pid": os.getpid(), "rank": os.environ.get("RANK", "0")}
    try:
        tmp = os.path.join(folder, f".{os.getpid()}.tmp")
        with open(tmp, "w") as handle:
            json.dump(note, handle)
        os.replace(tmp, os.path.join(folder, f"{os.getpid()}.json"))
    except OSError:
        pass  # the launcher then reports as it would without us
