"""Shared timing helpers for the benchmarks: interleaved runs, median wall time (:func:`compare`) or
CPU time (:func:`cpu_times`)."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def compare(fns: dict[str, Callable[[], object]], repeats: int = 15, warmup: int = 3) -> dict[str, float]:
    """Median milliseconds per call of each function, measured in one run.

    The functions are called in turn within each round (round-robin), so a machine that slows down
    or speeds up during the run affects all of them alike and the ratios stay meaningful.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def cpu_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median CPU seconds per call of each function, after one warm-up call each; interleaved as in
    :func:`compare`, so load drifts hit all alike (CPU time is steadier than wall time on a shared
    machine)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.process_time()
            fn()
            times[name].append(time.process_time() - start)
    return {k: statistics.median(v) for k, v in times.items()}
