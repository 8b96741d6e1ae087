"""CPU threads for the scripts: how many compute threads, and how idle OpenMP threads wait (README, "CPU threads").

PyTorch's defaults assume the CPU is ours alone: one compute thread per physical core of the machine (not of
the cores this process may use), and OpenMP threads that busy-wait between the many small parallel regions
of a training step. On a shared CPU the spinning threads take the cores the other processes need, and a
step can take many times longer. Every script therefore sets, before torch is imported (`run_cli` calls
`configure_cpu_threads` first; OpenMP reads its wait policy once, when it loads):

- the number of compute threads (`OMP_NUM_THREADS`, which torch reads at start), from `VAEBM_THREADS`:
  a number, `auto` (the physical cores in this process's CPU affinity mask, divided among the processes of
  a multi-process launch on this node), or `off` (torch's own default). Unset: `OMP_NUM_THREADS` when the
  user set it (`accelerate launch` always sets it: 1 per process unless told otherwise), else
  `DEFAULT_THREADS`.
- OpenMP's wait policy (`OMP_WAIT_POLICY`), from `VAEBM_WAIT_POLICY`: `PASSIVE` (idle threads sleep at
  once), `ACTIVE` (they spin) or `default` (OpenMP's own: spin a while, then sleep). Unset:
  `OMP_WAIT_POLICY` when the user set it, else `DEFAULT_WAIT_POLICY`.

The defaults below (1 thread, PASSIVE) are chosen by the measurements in README, "CPU threads".
This module imports nothing heavy (it must run before torch loads).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import UserError

DEFAULT_THREADS = "1"            # a number, auto or off: one thread won idle and busy (README, "CPU threads")
DEFAULT_WAIT_POLICY = "PASSIVE"  # PASSIVE, ACTIVE or default
WAIT_POLICIES = ("PASSIVE", "ACTIVE", "default")


@dataclass
class ThreadSetting:
    """What `configure_cpu_threads` chose: threads None = torch's default; wait_policy None = OpenMP's."""

    threads: int | None
    wait_policy: str | None
    source: str              # where the thread count came from: VAEBM_THREADS, OMP_NUM_THREADS or default


def configure_cpu_threads(environ=None) -> ThreadSetting:
    """Put the thread count and wait policy into `environ` (default `os.environ`) for torch and OpenMP to read
    when they load, and for child processes to inherit. If torch is already loaded, also set its thread
    count (the wait policy then applies to child processes only). Bad values raise UserError."""
    environ = os.environ if environ is None else environ
    threads, source = _chosen_threads(environ)
    if threads is not None:
        environ["OMP_NUM_THREADS"] = str(threads)
    policy = _chosen_wait_policy(environ)
    if policy is not None:
        environ["OMP_WAIT_POLICY"] = policy
    if threads is not None and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    return ThreadSetting(threads, policy, source)


def set_threads(threads: int) -> None:
    """Use `threads` compute threads: in the environment (torch not loaded yet, child processes) and in torch."""
    if threads < 1:
        raise UserError(f"the thread count must be >= 1, got {threads}")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def available_cores() -> int:
    """Physical cores among the CPUs this process may run on (its affinity mask); the number of those CPUs
    where the topology cannot be read."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:
            return len(cpus)
    return max(len(cores), 1)


def _chosen_threads(environ) -> tuple[int | None, str]:
    if "VAEBM_THREADS" in environ:
        value, source = environ["VAEBM_THREADS"].strip().lower(), "VAEBM_THREADS"
    elif "OMP_NUM_THREADS" in environ:
        value, source = environ["OMP_NUM_THREADS"].strip(), "OMP_NUM_THREADS"
    else:
        value, source = DEFAULT_THREADS, "default"
    if value == "off":
        return None, source
    if value == "auto":
        processes = int(environ.get("LOCAL_WORLD_SIZE", "1") or 1)  # set by accelerate launch / torchrun
        return max(available_cores() // max(processes, 1), 1), source
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"{source} must be a positive number of threads, auto or off, got '{value}'")
    return int(value), source


def _chosen_wait_policy(environ) -> str | None:
    if "VAEBM_WAIT_POLICY" in environ:
        value = environ["VAEBM_WAIT_POLICY"].strip()
        matches = [policy for policy in WAIT_POLICIES if policy.lower() == value.lower()]
        if not matches:
            raise UserError(f"VAEBM_WAIT_POLICY must be one of {', '.join(WAIT_POLICIES)}, got '{value}'")
        value = matches[0]
    elif "OMP_WAIT_POLICY" in environ:
        return environ["OMP_WAIT_POLICY"]  # the user's own: left as it is
    else:
        value = DEFAULT_WAIT_POLICY
    if value == "default":
        environ.pop("OMP_WAIT_POLICY", None)
        return None
    return value
