"""Host memory: keep the memory one training step frees for the next step (README, "Host memory").

On the CPU, every step allocates and frees the same activations and gradients: buffers of 0.1-30 MiB each.
glibc's malloc serves such blocks with fresh `mmap`s (from 128 KiB, a threshold it raises as such blocks are
freed, up to 32 MiB) and hands free memory at the top of its heap back to the kernel once it passes a trim
threshold. Either way the next step touches new pages, and the kernel zero-fills each one on its first
touch: thousands to tens of thousands of page faults per `nvae-bench-small` step at batch 8, about a tenth
of its time (README). Every script therefore fixes the mmap threshold at glibc's maximum (32 MiB) and turns
trimming off (`mallopt`), so freed blocks stay in the heap for the next step to reuse. The process then keeps
the largest heap it has used: a training step reaches it again every step; a one-off peak (an in-training
evaluation, say) stays held. Blocks over 32 MiB are still mapped and returned one by one, and the heaps of
threads other than the main one (glibc's arenas) may still be unmapped whole.

`VAEBM_MALLOC=keep|default` (unset: `keep`); `default` leaves glibc's behaviour. A user's own `MALLOC_*_`
variables or malloc tunables in `GLIBC_TUNABLES` are left as they are, and so is any C library other than
glibc (musl, macOS, Windows) or an allocator preloaded in glibc's place (jemalloc, tcmalloc, mimalloc:
glibc's settings do not reach it).
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
NEVER_TRIM = -1                         # read as SIZE_MAX: trimming off (mallopt(3))


def malloc_setting(environ=None) -> str:
    """What `keep_freed_host_memory` does in this environment (default `os.environ`), without doing it: `keep`,
    `default` (VAEBM_MALLOC=default), `user` (the user's own malloc settings), `preloaded` (another allocator
    in glibc's place) or `unsupported` (not glibc). A bad VAEBM_MALLOC raises UserError."""
    environ = os.environ if environ is None else environ
    choice = environ.get("VAEBM_MALLOC", "keep").strip().lower()
    if choice not in MALLOC_CHOICES:
        raise UserError(f"VAEBM_MALLOC must be one of {', '.join(MALLOC_CHOICES)}, got '{environ['VAEBM_MALLOC']}'")
    if choice == "default":
        return "default"
    if any(name.startswith("MALLOC_") and name.endswith("_") for name in environ) or \
            "malloc" in environ.get("GLIBC_TUNABLES", ""):
        return "user"
    if "malloc" in environ.get("LD_PRELOAD", ""):  # libjemalloc, libtcmalloc, libmimalloc
        return "preloaded"
    return "keep" if is_glibc() else "unsupported"


def keep_freed_host_memory(environ=None) -> str:
    """Apply `malloc_setting(environ)` to this process (see the module docstring); forked children inherit it,
    scripts started as new processes apply it themselves. Returns the setting (`unsupported` also when glibc
    refuses the values, as a 32-bit one would)."""
    setting = malloc_setting(environ)
    if setting != "keep":
        return setting
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # Either call also stops glibc from moving the two thresholds as blocks are freed.
    if not (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) and mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)):
        return "unsupported"
    return "keep"


def is_glibc() -> bool:
    """Whether this process runs on glibc (`os.confstr` names it; it raises or answers otherwise elsewhere)."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")  # "glibc 2.36"
    except (AttributeError, ValueError, OSError):
        return False
