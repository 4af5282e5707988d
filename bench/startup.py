"""Command-line start-up: CPU time of ``regfw plan``, ``regfw plugins``, ``regfw init`` and a config
error, next to ``import torch`` (the floor: these commands build a model) and ``regfw --help``.

Each command runs in a fresh interpreter; the CPU time (user + system of the child) is the median
of interleaved repeats, so a busy machine affects all alike. Also printed: the wall time, and the
CPU time of importing Lightning, which these commands no longer pay (``tests/test_startup.py``
checks that they do not import it).

Usage: ``python bench/startup.py [--repeats N]``.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one run of ``cmd``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    py = sys.executable
    regfw = [py, "-m", "regfw"]
    tmp = tempfile.mkdtemp(prefix="regfw-startup-")
    cases = {
        "python -c 'import torch'": [py, "-c", "import torch"],
        "python -c 'import pytorch_lightning'": [py, "-c", "import torch, pytorch_lightning"],
        "regfw --help": [*regfw, "--help"],
        "regfw plan templates/demo.yaml": [*regfw, "plan", "templates/demo.yaml"],
        "regfw plugins": [*regfw, "plugins"],
        "regfw init NEW.yaml": [*regfw, "init", os.path.join(tmp, "new.yaml"), "--force"],
        "a config error (trainer.max_epoch=3)": [*regfw, "plan", "templates/demo.yaml", "trainer.max_epoch=3"],
    }
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in cases}
    for _ in range(args.repeats):
        for name, cmd in cases.items():
            times[name].append(run(cmd))
    torch_cpu = statistics.median(c for c, _ in times["python -c 'import torch'"])
    print(f"start-up, median of {args.repeats} interleaved runs (CPU = user + system of the process)")
    for name, runs in times.items():
        cpu = statistics.median(c for c, _ in runs)
        wall = statistics.median(w for _, w in runs)
        print(f"    {name:<40} CPU {cpu:6.2f} s ({cpu / torch_cpu:4.2f}x import torch)   wall {wall:6.2f} s")


if __name__ == "__main__":
    main()
