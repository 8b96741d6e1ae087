"""Host memory: keep the memory one training step frees for the next step (README, "Host memory").

On the CPU, every step allocates and frees the same activations and gradients: buffers of 0.1-30 MiB each.
glibc's malloc serves such blocks with fresh `mmap`s (from 128 KiB, a threshold it raises as such blocks are
freed, up to 32 MiB) and hands free memory at the top of its heap back to the kernel once it passes a trim
threshold. Either way the next step touches new pages, and the kernel zero-fills each one on its first
touch: 30,000-50,000 page faults per `nvae-bench-small` step at batch 8, about a tenth of its time. Every
script therefore fixes the mmap threshold at glibc's maximum (32 MiB) and turns trimming off (`mallopt`),
so freed blocks stay in the heap for the next step to reuse. The process then holds its peak heap, which a
training process reaches again every step anyway.

`VAEBM_MALLOC=keep|default` (unset: `keep`); `default` leaves glibc's behaviour. A user's own
`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_` or malloc tunables in `GLIBC_TUNABLES` are left as they
are, and so is any C library other than glibc (musl, macOS, Windows) or an allocator preloaded in glibc's
place (jemalloc, tcmalloc: glibc's settings do not reach it).
This module imports nothing heavy (it runs before torch loads).
"""
from __future__ import annotations

import ctypes
import os

from trainer.errors import UserError

MALLOC_CHOICES = ("keep", "default")
M_TRIM_THRESHOLD = -1       # mallopt parameters, from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024   # glibc's largest on 64-bit systems (4 MiB * sizeof(long))
NEVER_TRIM = 2**31 - 1                  # mallopt takes an int; 2 GiB of free heap top is never reached


def keep_freed_host_memory(environ=None) -> str:
    """Apply `VAEBM_MALLOC` (see the module docstring) to this process; its children inherit it if they are
    forked, and apply it themselves when they are scripts. Returns what was done: `keep`, `default`,
    `user` (the user's own malloc settings) or `unsupported` (not glibc). A bad value raises UserError."""
    environ = os.environ if environ is None else environ
    choice = environ.get("VAEBM_MALLOC", "keep").strip().lower()
    if choice not in MALLOC_CHOICES:
        raise UserError(f"VAEBM_MALLOC must be one of {', '.join(MALLOC_CHOICES)}, got '{environ['VAEBM_MALLOC']}'")
    if choice == "default":
        return "default"
    if ("MALLOC_MMAP_THRESHOLD_" in environ or "MALLOC_TRIM_THRESHOLD_" in environ
            or "malloc" in environ.get("GLIBC_TUNABLES", "")):
        return "user"
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return "unsupported"
    # The mmap threshold first: a fixed one also stops glibc from moving the trim threshold.
    if not (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) and mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)):
        return "unsupported"
    return "keep"


def _glibc_mallopt():
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION")  # "glibc 2.36" on glibc systems
    except (AttributeError, ValueError, OSError):
        return None
    if not libc or not libc.startswith("glibc"):
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt
