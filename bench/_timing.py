"""Shared timing helper for the benchmarks: interleaved runs, median wall time in milliseconds."""
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
