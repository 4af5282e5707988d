"""Dropout masks on CPU: regfw's sliced random words against torch's ways of drawing them.

For 13.9 million entries (the mask entries of one T = 30 MC dropout call of the MLP in
``bench/mc_dropout.py``: 7680 rows x (784 + 512 + 512)), one thread, CPU time of each variant
measured side by side (median of interleaved repeats), as a ratio to one elementwise multiply
``x * 2`` (the memory floor of applying any mask):

* ``regfw dropout``: :func:`regfw.layers.dropout` on CPU (words, threshold, float mask, product);
* ``regfw mask only``: :func:`regfw.layers.masks.drop_mask` (the boolean mask alone);
* ``rand_like >= p`` (regfw's previous CPU path), ``bernoulli_`` and ``F.dropout`` (torch's kernel).

Usage: ``python bench/masks.py [--repeats N] [--entries N]``.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _timing import cpu_times  # bench/ is the script directory, on sys.path

from regfw.layers import masks
from regfw.layers.dropout import dropout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--entries", type=int, default=7680 * (784 + 512 + 512))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    p = 0.5
    x = torch.randn(args.entries)
    fns: dict[str, Callable[[], object]] = {
        "x * 2 (floor)": lambda: x * 2.0,
        "regfw dropout": lambda: dropout(x, p),
        "regfw mask only": lambda: masks.drop_mask(x.shape, p),
        "rand_like >= p, applied": lambda: x * (torch.rand_like(x) >= p).to(x.dtype).mul_(1 / (1 - p)),
        "rand_like >= p, mask only": lambda: torch.rand_like(x) >= p,
        "bernoulli_, applied": lambda: x * torch.empty_like(x).bernoulli_(1 - p).mul_(1 / (1 - p)),
        "F.dropout": lambda: F.dropout(x, p, training=True),
    }
    t = cpu_times(fns, args.repeats)
    base = t["x * 2 (floor)"]
    print(f"torch {torch.__version__}, CPU, 1 thread, {args.entries / 1e6:.1f} M entries, p = {p}, "
          f"median CPU time of {args.repeats} interleaved repeats")
    for name, sec in t.items():
        print(f"    {name:<28} {sec * 1e3:8.1f} ms   {sec / base:5.2f}x one multiply")
    print(f"    F.dropout / regfw dropout = {t['F.dropout'] / t['regfw dropout']:.1f}x; "
          f"rand_like path / regfw dropout = {t['rand_like >= p, applied'] / t['regfw dropout']:.1f}x")


if __name__ == "__main__":
    main()
