"""CPU time of the MC callback's five figures (classification with calibration and an OOD set, as
in the demo), drawn with matplotlib and written as SVG and as PNG, side by side in one run.

Usage: ``python bench/plots.py [--repeats 5] [--rows 450]``.
"""
from __future__ import annotations

import argparse
import tempfile

import torch
from _timing import cpu_times

from regfw.uncertainty.accumulators import MCClassificationMetrics
from regfw.uncertainty.figures.jobs import draw_plots
from regfw.uncertainty.metrics import retained_curve
from regfw.uncertainty.ood import OOD_SCORES
from regfw.uncertainty.selective import risk_coverage
from regfw.uncertainty.summaries import classification_summary


def plot_data(rows: int) -> dict:
    """What the callback hands to the plot thread, from seeded random MC probabilities."""
    g = torch.Generator().manual_seed(0)
    metric = MCClassificationMetrics()
    probs = torch.softmax(3 * torch.randn(30, rows, 5, generator=g), -1)
    y = torch.randint(0, 5, (rows,), generator=g)
    metric.update(classification_summary(probs), y)
    score, correct = metric.score_and_correct()
    ood = {k: torch.rand(rows, generator=g) for k in OOD_SCORES}  # all five, as the callback draws
    return {"task": "classification", "score_name": "mutual_information", "reliability": metric.reliability(),
            "reliability_after": metric.reliability(), "temperature": 1.3,
            "referral": retained_curve(score, correct), "referral_marker": 0.1, "score": score,
            "correct": correct >= 1.0, "risk_coverage": risk_coverage(score, correct),
            "ood": (ood, {k: v.flip(0) for k, v in ood.items()})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", type=int, default=450)
    args = parser.parse_args()
    data = plot_data(args.rows)
    with tempfile.TemporaryDirectory() as root:
        t = cpu_times({fmt: (lambda f=fmt: draw_plots(data, root, [], 0, "mc/", f)) for fmt in ("svg", "png")},
                      args.repeats)
    print(f"five MC figures, {args.rows} inputs, median CPU of {args.repeats}: svg {t['svg'] * 1e3:.0f} ms, "
          f"png {t['png'] * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
