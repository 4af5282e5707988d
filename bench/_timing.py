"""Shared timing helpers for the benchmarks: interleaved runs, median wall time (:func:`compare`) or
CPU time (:func:`cpu_times`), and the ``--device``/``--threads`` options (:func:`add_device_options`,
:func:`device_from`)."""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """``--device cpu|cuda`` and ``--threads N`` (default: 1 on CPU, so CPU time is one thread's)."""
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: 1 on CPU, so CPU time is one thread's)")


def device_from(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[torch.device, str]:
    """The device the options chose, with torch's thread count set, and a line naming it."""
    threads = args.threads or (1 if args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return device, f"torch {torch.__version__}, {name}"


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
