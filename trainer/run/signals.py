"""Graceful termination: SIGTERM, SIGINT and SIGUSR1 ask the training to checkpoint and exit cleanly.

Schedulers and Kubernetes send SIGTERM some time before they kill; Ctrl-C sends SIGINT; Slurm's `--signal`
sends SIGUSR1. The first such signal on any training process only sets a flag: the loop's collective stop
check (`trainer/run/rundir.py`, the same path as the STOP file) ORs the flags of all processes after every
step, so all processes write one checkpoint at the same step and exit with status 0. A second signal to a
process exits it at once (status 128 + the signal's number) without a checkpoint; the newest complete one
stays.

Forked data-loader workers inherit the handlers; there they do nothing, so a signal sent to the whole process
group (Ctrl-C, Slurm) does not kill the workers under the training process.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Callable

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopSignals:
    """The stop signals of one training process. `received` names the first one that arrived (e.g. "SIGTERM")."""

    def __init__(self, on_exit: Callable[[], None] = lambda: None):
        self.received: str | None = None
        self.on_exit = on_exit  # runs before a second signal's immediate exit (e.g. releasing the run lock)
        self._pid = os.getpid()
        self._previous: dict[int, object] = {}

    def install(self) -> "StopSignals":
        """Take over the stop signals (the main thread only can; elsewhere this does nothing)."""
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Give the signals back to their previous handlers."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:
            return  # a forked data worker: the training process decides
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name  # no printing here: the handler may interrupt a write to the same stream
            return
        message = f"error: second stop signal ({name}): exiting at once without a checkpoint\n"
        os.write(2, message.encode())  # unbuffered: safe inside a signal handler
        try:
            self.on_exit()
        finally:
            os._exit(128 + signum)
