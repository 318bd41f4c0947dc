"""The timing helpers of the benchmark scripts (they run as ``python benchmarks/<script>.py``,
so this module is importable beside them)."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping


def seconds_per_call(fn: Callable[[], object], calls: int) -> float:
    """Mean wall-clock seconds of ``fn()`` over ``calls`` back-to-back calls (no warm-up: callers
    warm up once themselves, and interleave repetitions of the variants they compare)."""
    return cpu_and_wall_per_call(fn, calls)[1]


def cpu_and_wall_per_call(fn: Callable[[], object], calls: int) -> tuple[float, float]:
    """Mean (process CPU seconds, wall seconds) of ``fn()`` over ``calls`` back-to-back calls.

    CPU time counts only this process's work, so on a shared machine its ratios between variants
    are robust to the load; wall time is what a user waits."""
    if calls < 1:
        raise ValueError(f"calls must be >= 1, got {calls}")
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.process_time() - c0) / calls, (time.perf_counter() - t0) / calls


def interleaved(variants: Mapping[str, Callable[[], object]], steps: int, rounds: int,
                warmup: int = 2) -> dict[str, dict[str, float]]:
    """Time ``variants`` in alternating blocks of ``steps`` calls, ``rounds`` times (the order
    reversed every other round), after ``warmup`` calls of each.

    Returns ``{name: {"cpu_ms", "wall_ms"}}``: medians over rounds of the per-call means, and
    for every variant but the first ``"cpu_ratio"`` / ``"wall_ratio"``: the median over rounds of
    its time divided by the first variant's time in the same round.
    """
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    per_round: list[dict[str, tuple[float, float]]] = []
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        per_round.append({name: cpu_and_wall_per_call(variants[name], steps) for name in order})
    base = names[0]
    out: dict[str, dict[str, float]] = {}
    for name in names:
        row = {"cpu_ms": 1000 * statistics.median(t[name][0] for t in per_round),
               "wall_ms": 1000 * statistics.median(t[name][1] for t in per_round)}
        if name != base:
            row["cpu_ratio"] = statistics.median(t[name][0] / t[base][0] for t in per_round)
            row["wall_ratio"] = statistics.median(t[name][1] / t[base][1] for t in per_round)
        out[name] = row
    return out


def load_note() -> str:
    """The machine's load averages (1, 5, 15 min) and core count, for a results table."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} on {os.cpu_count()} cores"
