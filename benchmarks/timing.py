"""The one timing helper of the benchmark scripts (they run as ``python benchmarks/<script>.py``,
so this module is importable beside them)."""

from __future__ import annotations

import time
from collections.abc import Callable


def seconds_per_call(fn: Callable[[], object], calls: int) -> float:
    """Mean wall-clock seconds of ``fn()`` over ``calls`` back-to-back calls (no warm-up: callers
    warm up once themselves, and interleave repetitions of the variants they compare)."""
    if calls < 1:
        raise ValueError(f"calls must be >= 1, got {calls}")
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls
