"""Keep memory that a training step frees inside the process, for the next step (glibc malloc).

    from kdtune.allocator import keep_freed_memory
    keep_freed_memory()          # True where applied (Linux with glibc), False elsewhere: a no-op

Why: a CPU training step allocates its activations in the forward pass and frees them at the end of
the backward pass. glibc's malloc gives blocks larger than ``M_MMAP_THRESHOLD`` their own fresh
``mmap`` and returns free memory at the top of its heap to the operating system once more than
``M_TRIM_THRESHOLD`` bytes are free there (128 KiB at first; both thresholds rise with the largest
block freed so far, the trim threshold to twice it). A step's activations (6.4 MB for a 16 x 28 x 28
map at batch 128) often go back to the system at the end of a step, and the next step faults their
pages in again while the kernel zeroes them (what that costs whole runs: benchmarks/RESULTS.md,
``allocator``). With the trim threshold at 1 GiB and the mmap threshold at glibc's maximum
(32 MiB), freed blocks stay in the heap and are reused. The ``MALLOC_TRIM_THRESHOLD_`` /
``MALLOC_MMAP_THRESHOLD_`` environment variables do the same at start-up, and PyTorch's CPU
performance guides preload jemalloc or tcmalloc for it; this needs neither.

The cost: the process keeps its peak heap (the memory a step needs anyway) until it exits. Settings
are process-wide and, once made, stay for the process (glibc then stops adjusting its thresholds).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_memory"]

#: glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Free heap kept before memory goes back to the system (mallopt takes a C int).
TRIM_THRESHOLD = 1 << 30
#: Blocks above this get their own mmap; 32 MiB is the largest value glibc accepts on 64-bit systems.
MMAP_THRESHOLD = 32 << 20

_applied: bool | None = None


def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc (it has ``mallopt`` and ``gnu_get_libc_version``), else None."""
    if platform.system() != "Linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def keep_freed_memory() -> bool:
    """Set glibc's trim threshold to :data:`TRIM_THRESHOLD` and its mmap threshold to
    :data:`MMAP_THRESHOLD` for this process; returns whether both settings took effect.

    Idempotent (the first call's result is returned again). On other systems or C libraries
    (macOS, Windows, musl) nothing is changed and it returns False.
    """
    global _applied
    if _applied is None:
        libc = _glibc()
        if libc is None:
            _applied = False
        else:
            libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            libc.mallopt.restype = ctypes.c_int
            _applied = (libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
                        and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1)
    return _applied
