"""Test RMSE and log-likelihood of a ``regfw fit`` run on a UCI split, in the original target units.

The run's ``config.yaml`` says the data set and split (``data.init_args``) and the noise precision
(``regularizers.weight_decay.prior.tau``, in original units as in the paper; ``--tau`` overrides it).
The checkpoint's model is sampled T times on the test rows with ``regfw.uncertainty.mc_predict``,
its outputs mapped back to the original units (``y * sigma_y + mu_y`` of the training rows); the
test RMSE of the MC mean and the test log-likelihood of the MC mixture (Gal & Ghahramani 2016,
the negated ``MCResult.nll_mixture``) are printed.

Usage: ``PYTHONPATH=bench python bench/uci_evaluate.py RUN_DIR [--samples 10000] [--tau TAU]
[--checkpoint last.ckpt]`` (docs/regression.md).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from uci_data import load_split  # noqa: E402


def evaluate(run_dir: Path, samples: int = 10_000, tau: float | None = None,
             checkpoint: str = "last.ckpt") -> tuple[float, float]:
    """``(test RMSE, test log-likelihood)`` of the run in ``run_dir``, original units."""
    from regfw import RegularizedModule
    from regfw.uncertainty import mc_predict

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    data = config["data"].get("init_args") or {}
    if tau is None:
        tau = float(config["regularizers"]["weight_decay"]["prior"]["tau"])
    split = load_split(data.get("name", "yacht"), int(data.get("split", 0)))  # standardised as the fit saw it
    module = RegularizedModule.load_from_checkpoint(run_dir / "checkpoints" / checkpoint)
    result = mc_predict(module.model, split.x_test, samples=samples, task="regression", tau=tau, seed=0,
                        output_transform=lambda out: out * split.y_std + split.y_mean)  # original units
    rmse = float((result.mean - split.y_test).pow(2).mean().sqrt())
    ll = float(-result.nll_mixture(split.y_test, tau).mean())  # the paper's test log-likelihood
    return rmse, ll


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="test RMSE and log-likelihood of a regfw fit run on a UCI split")
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--samples", type=int, default=10_000, help="MC samples T (the paper: 10,000)")
    ap.add_argument("--tau", type=float, default=None, help="noise precision in original units (default: the prior's)")
    ap.add_argument("--checkpoint", default="last.ckpt", help="a file in RUN_DIR/checkpoints (default last.ckpt)")
    args = ap.parse_args(argv)
    rmse, ll = evaluate(args.run_dir, args.samples, args.tau, args.checkpoint)
    print(f"test RMSE {rmse:.4f}, test log-likelihood {ll:.4f} (original units, T = {args.samples})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
