"""User-facing errors: one line, exit code 2, no traceback.

Library code raises `UserError` for mistakes a user can fix (a missing file, a bad config key, a
bad value). Entry points wrap `main` in `run_cli`, which prints the message on one line to stderr and
exits with status 2. Bugs (any other exception) still surface with a full traceback.
"""
from __future__ import annotations

import os
import sys
from typing import Callable


class UserError(Exception):
    """A mistake in the user's input: reported as one line, exit code 2."""


def run_cli(main: Callable[[], int | None]) -> None:
    """Set the CPU thread policy (before torch loads, `trainer/run/threads.py`), run `main()`; turn
    `UserError` into `error: <message>` on stderr and exit code 2."""
    from trainer.run.threads import configure_cpu_threads

    try:
        configure_cpu_threads()
        code = main()
    except UserError as err:
        message = " ".join(str(err).split())  # one line, whatever the message held
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    # Exit at once: interpreter teardown of thousands of imported modules (torch, deepspeed, ...)
    # takes tens of seconds on a loaded machine, which delays requeues after preemption. Everything
    # the scripts write is closed or flushed by now (files are written atomically).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
