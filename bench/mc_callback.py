"""Cost of the MC dropout callback on the demo: ``regfw fit templates/demo.yaml`` with the callback
against the same fit with ``uncertainty.enabled=false`` (target: <= 1.2x).

The demo's config runs temperature scaling and the held-out-classes OOD set besides the MC metrics;
the second pair of fits switches both off (the callback of issue 16's measurement). Each pair trains
on the same data (the calibration split is held out of training either way), in
one process, alternating, after one warm-up pair; the script prints the median CPU time (the
process's, all threads: plots drawn on the background thread count too) and wall time of each, and
their ratios side by side.

Usage: ``python bench/mc_callback.py [--epochs 60] [--repeats 3] [--threads 1] [--config templates/demo.yaml]``.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch


def _fit(config: str, overrides: list[str], root: str) -> Callable[[], object]:
    from regfw.config.schema import load_config
    from regfw.run.job import fit

    def run() -> object:
        cfg = load_config(config, [*overrides, f"run.dir={root}", "trainer.enable_progress_bar=false",
                                   "trainer.enable_model_summary=false"])
        return fit(cfg, quiet=True)

    return run


def _measure(fn: Callable[[], object]) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="templates/demo.yaml")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    base = [f"trainer.max_epochs={args.epochs}"]
    mc_only = [*base, "uncertainty.calibration.enabled=false", "uncertainty.ood=null"]
    with tempfile.TemporaryDirectory() as root:
        fns = {
            "with callback": _fit(args.config, base, root),
            "without": _fit(args.config, [*base, "uncertainty.enabled=false"], root),
            "MC only": _fit(args.config, mc_only, root),
            "MC only, off": _fit(args.config, [*mc_only, "uncertainty.enabled=false"], root),
        }
        for fn in fns.values():  # warm-up: imports, the fast strategy's first split
            fn()
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
        for _ in range(args.repeats):
            for name, fn in fns.items():
                times[name].append(_measure(fn))
    cpu = {n: statistics.median(t[0] for t in ts) for n, ts in times.items()}
    wall = {n: statistics.median(t[1] for t in ts) for n, ts in times.items()}
    print(f"regfw fit {args.config} trainer.max_epochs={args.epochs}, {args.threads} thread(s), "
          f"median of {args.repeats} alternating runs")
    print(f"{'':16}{'CPU s':>8}{'wall s':>8}")
    for name in fns:
        print(f"{name:16}{cpu[name]:8.2f}{wall[name]:8.2f}")
    for label, on, off in (("config as is", "with callback", "without"),
                           ("MC only (no calibration, no OOD set)", "MC only", "MC only, off")):
        print(f"ratio, {label}: CPU {cpu[on] / cpu[off]:.2f}x, wall {wall[on] / wall[off]:.2f}x   (target <= 1.2x)")


if __name__ == "__main__":
    main()
