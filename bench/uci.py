"""Gal & Ghahramani's UCI regression benchmark (ICML 2016, Table 1) through regfw, beside a plain loop.

The paper's protocol as published with its code, on yacht, energy, concrete and wine-quality-red
(``bench/data/uci/``, the 20 published splits): one hidden layer of 50 ReLU units; dropout at rate
p on the input and on the hidden layer; inputs and targets standardised on the training split;
the weight prior ``reg = l^2 (1 - p) / (2 N tau)``, l = 1e-2, as ``mse + reg * sum(w^2)`` over the
weights; Adam (lr 1e-3), batch 128, 4000 epochs; test RMSE of the MC mean and test log-likelihood
of the MC mixture, T = 10,000 samples, in the original target units. p and tau per split are the
paper's grid-search winners (``chosen_hyperparameters.txt``), or, with ``--grid``, chosen here by
the paper's grid search (the first 80% of the training rows against the last 20%, best validation
log-likelihood), each side by its own search, then retrained on the whole training part.

Two sides, same splits, same initial weights (Glorot uniform, zero biases, as Keras), in one run:

``regfw``
    regfw's public API only: ``RegularizedModule`` with ``regularizers: {dropout: {input: p,
    hidden: p}, weight_decay: {prior: {length_scale: 0.01, tau: tau}}}`` trained by a Lightning
    ``Trainer``; ``regfw.uncertainty.mc_predict`` with an ``output_transform`` to the original
    units; the log-likelihood is ``MCResult.ll_mixture(targets)`` (:func:`regfw_ll`).
``plain``
    a bare PyTorch loop (``nn.Dropout``, the L2 term written out) and the paper's formula
    ``logsumexp_t(-tau/2 (y - yhat_t)^2) - log T - log(2 pi)/2 + log(tau)/2`` computed here.

Prints, per data set, RMSE and log-likelihood as mean ± standard error over the splits run
(sample standard deviation / sqrt(splits)) for both sides next to the paper's numbers, each side's
CPU seconds per split (``time.process_time`` of the worker), and the largest difference between
regfw's mixture log-likelihood and the paper's formula on the same regfw samples.

Usage: ``python bench/uci.py [--splits 5] [--first 0] [--datasets yacht,energy,...] [--epochs 4000]
[--samples 10000] [--grid] [--processes 2]``; ``make bench-uci`` runs the defaults (5 splits per
data set; the cost per split is printed, so a full run can be sized from a short one).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from uci_data import DATASETS, P_GRID, PAPER, TAU_GRID, Split, chosen_hyperparameters, load_split  # noqa: E402

LENGTH_SCALE = 1e-2
HIDDEN = 50
BATCH = 128
LR = 1e-3
#: Rows of test inputs per MC chunk of the plain side: T x rows x 50 floats at a time.
PLAIN_CHUNK = 500


def make_net(d: int, seed: int) -> nn.Sequential:
    """``d -> 50 ReLU -> 1``, Glorot-uniform weights and zero biases (Keras's defaults)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(d, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))
    for m in net:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return net


def paper_reg(p: float, n: int, tau: float) -> float:
    """The paper's code's ``reg``: the coefficient of ``sum(w^2)`` added to the mean squared error."""
    return LENGTH_SCALE ** 2 * (1 - p) / (2 * n * tau)


def paper_ll(samples: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-point test log-likelihood of the MC mixture, the paper's formula (float64).

    ``samples``: ``[T, M]`` predictions in original units; ``y``: ``[M]``.
    """
    s, y = samples.double(), y.double()
    t = s.shape[0]
    return (torch.logsumexp(-0.5 * tau * (y[None] - s) ** 2, 0) - math.log(t) - 0.5 * math.log(2 * math.pi)
            + 0.5 * math.log(tau))


def regfw_ll(result: object, targets: torch.Tensor) -> torch.Tensor:
    """regfw's per-point mixture log-likelihood of ``targets``, with the tau the samples were drawn with."""
    return result.ll_mixture(targets).reshape(-1)  # type: ignore[attr-defined]


@dataclass
class Score:
    rmse: float
    ll: float
    cpu_s: float
    #: regfw only: max |regfw's LL - the paper's formula on the same samples| over the test points.
    formula_gap: float = float("nan")


# --------------------------------------------------------------------------- the two sides


def fit_regfw(s: Split, p: float, tau: float, epochs: int, samples: int, seed: int) -> Score:
    """Train and score through regfw's public API (RegularizedModule, Trainer, mc_predict)."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from regfw import RegularizedModule
    from regfw.uncertainty import mc_predict

    start = time.process_time()
    net = make_net(s.x_train.shape[1], seed)
    module = RegularizedModule(
        net, loss="mse", task="regression", n_examples=s.n_train, example_input=s.x_train[:2],
        regularizers={"dropout": {"input": p, "hidden": p},
                      "weight_decay": {"prior": {"length_scale": LENGTH_SCALE, "tau": tau}}},
        optimizer={"name": "adam", "lr": LR})
    torch.manual_seed(seed + 1)
    loader = DataLoader(TensorDataset(s.x_train, s.y_train), batch_size=BATCH, shuffle=True)
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1, num_sanity_val_steps=0)
    trainer.fit(module, loader)
    result = mc_predict(module.model, s.x_test, samples=samples, task="regression", seed=seed, tau=tau,
                        output_transform=lambda out: out * s.y_std + s.y_mean, deterministic=False)
    mean = result.mean.reshape(-1)  # type: ignore[attr-defined]
    y = s.y_test.reshape(-1)
    ll = regfw_ll(result, s.y_test)
    gap = float((ll.double() - paper_ll(result.sample_means.reshape(samples, -1), y, tau))
                .abs().max())
    return Score(float(((mean - y) ** 2).mean().sqrt()), float(ll.mean()), time.process_time() - start, gap)


def fit_plain(s: Split, p: float, tau: float, epochs: int, samples: int, seed: int) -> Score:
    """The same protocol as a bare PyTorch loop, scored with the paper's formula."""
    start = time.process_time()
    body = make_net(s.x_train.shape[1], seed)
    net = nn.Sequential(nn.Dropout(p), body[0], body[1], nn.Dropout(p), body[2])
    weights = [body[0].weight, body[2].weight]
    reg = paper_reg(p, s.n_train, tau)
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(seed + 1)
    n = s.n_train
    net.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, BATCH):
            idx = order[i:i + BATCH]
            loss = nn.functional.mse_loss(net(s.x_train[idx]), s.y_train[idx])
            loss = loss + reg * sum(w.pow(2).sum() for w in weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    torch.manual_seed(seed)
    preds = []
    with torch.no_grad():
        for i in range(0, s.x_test.shape[0], PLAIN_CHUNK):
            x = s.x_test[i:i + PLAIN_CHUNK]
            preds.append(net(x.repeat(samples, 1)).view(samples, -1))
    out = torch.cat(preds, 1) * s.y_std + s.y_mean
    y = s.y_test.reshape(-1)
    rmse = float(((out.mean(0) - y) ** 2).mean().sqrt())
    return Score(rmse, float(paper_ll(out, y, tau).mean()), time.process_time() - start)


SIDES: dict[str, Callable[..., Score]] = {"regfw": fit_regfw, "plain": fit_plain}


# --------------------------------------------------------------------------- one split


def quiet_lightning() -> None:
    """Lightning's notes about in-memory data (no workers, no validation loop) and its epoch lines off."""
    import logging
    import warnings

    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for text in ("does not have many workers", "no `val_dataloader`", "GPU available", "LeafSpec", "TPU available"):
        warnings.filterwarnings("ignore", f".*{text}.*")


@dataclass
class Job:
    dataset: str
    split: int
    side: str
    epochs: int
    samples: int
    grid: bool
    data_dir: Path
    threads: int = 1


@dataclass
class Outcome:
    job: Job
    score: Score
    p: float
    tau: float
    grid_log: list[str] = field(default_factory=list)


def run_job(job: Job) -> Outcome:
    """One data set, split and side: the grid search (``--grid``) or the chosen (p, tau), then the fit."""
    torch.set_num_threads(job.threads)
    quiet_lightning()
    fit = SIDES[job.side]
    log: list[str] = []
    if job.grid:
        val = load_split(job.dataset, job.split, job.data_dir, validation=True)
        best = None
        for p in P_GRID:
            for tau in TAU_GRID[job.dataset]:
                score = fit(val, p, tau, job.epochs, job.samples, seed=job.split)
                log.append(f"{job.dataset} split {job.split} {job.side}: p {p:g} tau {tau:g} validation LL "
                           f"{score.ll:.4f}")
                if best is None or score.ll > best[0]:
                    best = (score.ll, p, tau)
        assert best is not None
        p, tau = best[1], best[2]
    else:
        p, tau = chosen_hyperparameters(job.dataset, job.data_dir)[job.split]
    score = fit(load_split(job.dataset, job.split, job.data_dir), p, tau, job.epochs, job.samples, seed=job.split)
    return Outcome(job, score, p, tau, log)


# --------------------------------------------------------------------------- the table


def mean_se(values: Sequence[float]) -> str:
    """``mean ± standard error`` (sample standard deviation / sqrt(n)); one value has no error."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return f"{m:.2f} ± n/a "
    return f"{m:.2f} ± {statistics.stdev(values) / math.sqrt(len(values)):.2f}"


def table(outcomes: list[Outcome], datasets: Sequence[str]) -> list[str]:
    """The comparison table: RMSE and test LL, regfw | plain | paper, per data set."""
    head = (f"{'data set':<17}{'splits':>6}  {'RMSE regfw':>12}  {'RMSE plain':>12}  {'RMSE paper':>12}   "
            f"{'LL regfw':>13}  {'LL plain':>13}  {'LL paper':>13}  {'CPU s/split regfw/plain':>24}  "
            f"{'max|LL-formula|':>15}")
    lines = [head, "-" * len(head)]
    for name in datasets:
        by = {side: sorted((o for o in outcomes if o.job.dataset == name and o.job.side == side),
                           key=lambda o: o.job.split) for side in SIDES}
        if not by["regfw"] or not by["plain"]:
            continue
        (prm, prs), (plm, pls) = PAPER[name]
        r, q = [o.score for o in by["regfw"]], [o.score for o in by["plain"]]
        cpu_r, cpu_q = statistics.fmean(x.cpu_s for x in r), statistics.fmean(x.cpu_s for x in q)
        lines.append(
            f"{name:<17}{len(r):>6}  {mean_se([x.rmse for x in r]):>12}  {mean_se([x.rmse for x in q]):>12}  "
            f"{f'{prm:.2f} ± {prs:.2f}':>12}   {mean_se([x.ll for x in r]):>13}  {mean_se([x.ll for x in q]):>13}  "
            f"{f'{plm:.2f} ± {pls:.2f}':>13}  {f'{cpu_r:.1f} / {cpu_q:.1f} ({cpu_r / cpu_q:.2f}x)':>24}  "
            f"{max(x.formula_gap for x in r):>15.1e}")
    return lines


def per_split(outcomes: list[Outcome]) -> list[str]:
    rows = sorted(outcomes, key=lambda o: (o.job.dataset, o.job.split, o.job.side))
    return [f"{o.job.dataset:<17} split {o.job.split:>2} {o.job.side:<5} p {o.p:<6g} tau {o.tau:<6g} "
            f"RMSE {o.score.rmse:.4f}  LL {o.score.ll:.4f}  CPU {o.score.cpu_s:.1f} s" for o in rows]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--splits", type=int, default=5, help="the first N of the 20 published splits (default 5)")
    ap.add_argument("--first", type=int, default=0,
                    help="start at this split (a long run in parts: each split's result depends only on its own seed)")
    ap.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated (default: all four)")
    ap.add_argument("--epochs", type=int, default=4000, help="training epochs (the paper: 4000)")
    ap.add_argument("--samples", type=int, default=10_000, help="MC samples T (the paper: 10,000)")
    ap.add_argument("--grid", action="store_true", help="choose p and tau by the paper's grid search")
    ap.add_argument("--processes", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--data", type=Path, default=None, help="the data folder (default bench/data/uci)")
    args = ap.parse_args(argv)
    from uci_data import DATA_DIR

    datasets = [d for d in args.datasets.split(",") if d]
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown or not 1 <= args.splits <= 20 or not 0 <= args.first < args.splits:
        ap.error(f"--datasets: unknown {unknown} (expected some of {', '.join(DATASETS)})" if unknown
                 else f"--splits: got {args.splits}, expected 1 to 20" if not 1 <= args.splits <= 20
                 else f"--first: got {args.first}, expected 0 to {args.splits - 1} (below --splits)")
    data_dir = args.data or DATA_DIR
    # the biggest data sets first, so the two workers finish together
    jobs = [Job(d, k, side, args.epochs, args.samples, args.grid, data_dir)
            for d in reversed(datasets) for k in range(args.first, args.splits) for side in SIDES]
    chosen = "by grid search" if args.grid else "as the paper chose"
    print(f"UCI regression (Gal & Ghahramani 2016): {len(datasets)} data set(s) x splits "
          f"{args.first}-{args.splits - 1}, "
          f"{args.epochs} epochs, T = {args.samples}, p and tau {chosen}, {args.processes} process(es)", flush=True)
    wall = time.perf_counter()
    outcomes: list[Outcome] = []
    if args.processes > 1:
        with ProcessPoolExecutor(args.processes) as pool:
            for outcome in pool.map(run_job, jobs):
                outcomes.append(outcome)
    else:
        outcomes = [run_job(j) for j in jobs]
    for o in outcomes:
        for line in o.grid_log:
            print(line)
    print("\n".join(per_split(outcomes)))
    print()
    print("\n".join(table(outcomes, datasets)))
    print(f"\nwall {time.perf_counter() - wall:.0f} s; mean ± standard error over the splits run; the paper's numbers "
          f"are over 20 splits")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
