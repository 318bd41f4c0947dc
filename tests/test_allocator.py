"""kdtune.allocator: freed memory stays in the process (glibc), checked in fresh processes."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

from kdtune import allocator

#: A child process: malloc a 16 MiB block, free it, and report from glibc's mallinfo2 whether it was an mmap
#: of its own and whether the heap kept the freed bytes (the heap's size did not shrink back).
CHILD = """
import ctypes, sys
from kdtune.allocator import keep_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
size = 16 << 20
heap = libc.mallinfo2().arena
block = libc.malloc(size)
own_mmap = libc.mallinfo2().hblkhd >= size
libc.free(block)
kept = libc.mallinfo2().arena - heap >= size   # the heap grew by the block and did not give it back
print(applied, own_mmap, kept)
"""

def _has_mallinfo2() -> bool:
    lib = allocator._glibc()
    return lib is not None and hasattr(lib, "mallinfo2")


def _child(mode: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], check=True, capture_output=True, text=True)
    return out.stdout.split()


@pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
def test_freed_memory_stays_in_the_heap_only_when_kept():
    # glibc's defaults: a 16 MiB block is its own mmap, returned to the system when freed.
    assert _child("default") == ["None", "True", "False"]
    # Kept: the block comes from the heap and its bytes stay there, free for the next step.
    assert _child("keep") == ["True", "False", "True"]


def test_keep_freed_memory_is_idempotent_and_reports_where_it_applies(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", None)
    first = allocator.keep_freed_memory()
    assert first is (allocator._glibc() is not None)
    assert allocator.keep_freed_memory() is first


def test_no_glibc_is_a_no_op(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert allocator.keep_freed_memory() is False


def test_the_thresholds_fit_mallopt():
    # mallopt takes a C int; glibc refuses an mmap threshold above 32 MiB on 64-bit systems.
    assert allocator.TRIM_THRESHOLD < 2 ** 31 and allocator.MMAP_THRESHOLD <= 32 << 20
    assert ctypes.c_int(allocator.TRIM_THRESHOLD).value == allocator.TRIM_THRESHOLD
