"""``bench/uci.py`` (``make bench-uci``): its code path on one split with a few epochs and small T, the
paper's log-likelihood formula, and the data it ships."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


uci = _load("uci")


def test_one_split_prints_regfw_plain_and_the_paper_side_by_side(capsys):
    assert uci.main(["--datasets", "yacht", "--splits", "1", "--epochs", "3", "--samples", "50",
                     "--processes", "1"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    head = next(line for line in lines if line.startswith("data set"))
    for column in ("RMSE regfw", "RMSE plain", "RMSE paper", "LL regfw", "LL plain", "LL paper"):
        assert column in head
    row = next(line for line in lines if line.startswith("yacht ") and "0.67 ± 0.05" in line)
    assert "-1.25 ± 0.01" in row
    # regfw's mixture likelihood equals the paper's formula on the same samples (float64 both)
    gap = float(row.split()[-1])
    assert gap < 1e-6
    splits = [line for line in lines if line.startswith("yacht") and " split  0 " in line]
    assert [s.split()[3] for s in splits] == ["plain", "regfw"]
    assert all("p 0.01 " in s and "tau 0.75" in s for s in splits)  # chosen_hyperparameters.txt, split 0


def test_grid_search_tries_the_papers_grid_and_retrains_at_each_sides_best(capsys):
    assert uci.main(["--datasets", "yacht", "--splits", "1", "--epochs", "1", "--samples", "5", "--grid",
                     "--processes", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for side in ("regfw", "plain"):
        tried = [line for line in lines if line.startswith(f"yacht split 0 {side}: p ")]
        grid = [(float(t.split()[5]), float(t.split()[7]), float(t.split()[-1])) for t in tried]
        assert sorted((p, tau) for p, tau, _ in grid) == [(p, tau) for p in uci.P_GRID for tau in uci.TAU_GRID["yacht"]]
        best = max(grid, key=lambda g: g[2])
        final = next(line for line in lines if line.startswith("yacht ") and f" {side} p " in line)
        assert f"p {best[0]:<6g} tau {best[1]:<6g}" in final


def test_paper_ll_with_one_sample_is_the_gaussian_log_density():
    y = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    s = torch.tensor([[0.7, -1.0, 0.5]], dtype=torch.float64)
    tau = 0.75
    expected = torch.distributions.Normal(s[0], 1 / math.sqrt(tau)).log_prob(y)
    assert torch.allclose(uci.paper_ll(s, y, tau), expected, rtol=0, atol=1e-12)
    # T identical samples: the same value (the log T cancels the T equal terms)
    assert torch.allclose(uci.paper_ll(s.repeat(7, 1), y, tau), expected, rtol=0, atol=1e-12)


def test_standard_error_and_reg():
    assert uci.mean_se([1.0, 2.0, 3.0]) == f"2.00 ± {1 / math.sqrt(3):.2f}"
    assert uci.mean_se([1.5]) == "1.50 ± n/a "
    assert uci.paper_reg(0.05, 300, 0.5) == pytest.approx(1e-4 * 0.95 / 300, rel=1e-15)


def test_shipped_data_matches_its_readme():
    data = _load("uci_data")
    rows = {"yacht": (308, 6), "energy": (768, 8), "concrete": (1030, 8), "wine-quality-red": (1599, 11)}
    for name, (n, d) in rows.items():
        x_tr, y_tr, x_te, y_te = data.raw_split(name, 0)
        assert (len(x_tr) + len(x_te), x_tr.shape[1]) == (n, d)
        assert sorted(data.chosen_hyperparameters(name)) == list(range(20))
        split = data.load_split(name, 0)
        assert torch.allclose(split.y_train.mean(), torch.tensor(0.0), atol=1e-5)
        assert float(split.y_test.mean()) == pytest.approx(float(y_te.mean()), rel=1e-5)  # original units


def test_the_regression_example_of_the_docs_runs_and_reports_original_units(tmp_path, monkeypatch, capsys):
    """docs/regression.md: ``regfw fit bench/uci_yacht.yaml`` then ``regfw test CONFIG CKPT`` (2 epochs and
    small T here). The metrics are in original units: yacht's targets spread about 15 units, so an
    untrained net is off by several units, not by the standardised ~1, and the log-likelihood is the
    standardised one minus log sigma_y."""
    from regfw.cli.main import main

    monkeypatch.syspath_prepend(str(BENCH))  # PYTHONPATH=bench
    monkeypatch.chdir(tmp_path)
    config = str(BENCH / "uci_yacht.yaml")
    assert main(["fit", config, "--run-dir", "run", "trainer.max_epochs=2", "uncertainty.samples=5",
                 "trainer.check_val_every_n_epoch=1"]) == 0
    out = capsys.readouterr().out
    assert "mc/rmse " in out and "mc/ll_mixture " in out
    ckpt = "run/checkpoints/last.ckpt"
    assert main(["test", config, ckpt, "--samples", "20"]) == 0
    metrics = json.loads((tmp_path / "run" / "test_metrics.json").read_text())["metrics"]
    assert 3.0 < metrics["test/mc/rmse"] < 40.0
    assert main(["test", config, ckpt, "--samples", "20", "--out", "std.json", "uncertainty.units=standardized",
                 f"uncertainty.tau={0.75 * _yacht_std() ** 2!r}"]) == 0
    std = json.loads((tmp_path / "std.json").read_text())["metrics"]
    assert metrics["test/mc/rmse"] / std["test/mc/rmse"] == pytest.approx(_yacht_std(), rel=1e-4)
    assert std["test/mc/ll_mixture"] - metrics["test/mc/ll_mixture"] == pytest.approx(math.log(_yacht_std()),
                                                                                      abs=1e-3)


def _yacht_std() -> float:
    return float(_load("uci_data").load_split("yacht", 0).y_std)

