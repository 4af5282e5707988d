"""Trainer.predict with MC dropout, and `regfw predict` writing the review table."""
from __future__ import annotations

import csv

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from regfw.cli.predict import MCDropoutPredict, prediction_rows, write_table
from regfw.train.module import RegularizedModule
from regfw.uncertainty import mc_predict


def test_trainer_predict_is_monte_carlo_despite_eval_mode_and_equals_mc_predict():
    torch.manual_seed(0)
    module = RegularizedModule(nn.Sequential(nn.Linear(5, 32), nn.ReLU(), nn.Linear(32, 3)),
                               regularizers={"dropout": {"hidden": 0.5}})
    x = torch.randn(20, 5)
    loader = DataLoader(TensorDataset(x, torch.zeros(20, dtype=torch.long)), batch_size=20)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[MCDropoutPredict(samples=16, seed=3)])
    (out,) = trainer.predict(module, loader)  # Lightning predicts in eval mode (dropout off) ...
    assert float(out["mutual_information"].mean()) > 1e-4  # ... and the masks were random all the same
    from regfw.uncertainty.sampling import derive_seed

    ref = mc_predict(module, x, samples=16, seed=derive_seed(3, 0, 0, 0))
    assert torch.allclose(out["mean_probs"], ref.summary.mean_probs)
    assert "predict_step" not in module.__dict__  # unwrapped: a plain predict afterwards is deterministic


def test_rows_refer_by_threshold_or_fraction():
    preds = [{"prediction": torch.tensor([0, 1, 2, 1]), "mean_probs": torch.eye(3)[[0, 1, 2, 1]],
              "score": torch.tensor([0.1, 0.9, 0.5, 0.3])}]
    rows = prediction_rows(preds, "mutual_information", threshold=0.4)
    assert [r["refer"] for r in rows] == [False, True, True, False] and rows[0]["rule"] == "mutual_information > 0.4"
    assert {"index", "prediction", "prob_0", "prob_1", "prob_2", "score", "refer"} <= set(rows[0])
    rows = prediction_rows(preds, "mutual_information", refer_fraction=0.25)
    assert [r["refer"] for r in rows] == [False, True, False, False]


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        from regfw.errors import ConfigError

        with pytest.raises(ConfigError, match=r"writing Parquet needs pyarrow, which is not installed"):
            write_table([{"index": 0}], tmp_path / "p.parquet")
    else:
        import pyarrow.parquet as pq

        write_table([{"index": 0, "refer": True}], tmp_path / "p.parquet")
        assert pq.read_table(tmp_path / "p.parquet").to_pylist() == [{"index": 0, "refer": True}]


@pytest.mark.slow
def test_regfw_predict_writes_one_row_per_input_with_the_review_decision(tmp_path, monkeypatch, capsys):
    from regfw.cli.main import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.yaml").write_text("data: {name: digits}\nregularizers: {dropout: {}}\n"
                                       "trainer: {max_epochs: 1, enable_progress_bar: false}\n"
                                       "uncertainty: {samples: 4, plots: false, threshold: 0.05}\n")
    assert main(["fit", "cfg.yaml", "--run-dir", "run"]) == 0
    ckpt = next((tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    capsys.readouterr()
    assert main(["predict", "cfg.yaml", str(ckpt), "uncertainty.samples=8", "--out", "out/pred.csv"]) == 0
    with open(tmp_path / "out" / "pred.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 449  # the digits validation split (1797 * 0.25), one row per input
    assert {"prediction", "prob_9", "entropy", "mutual_information", "variation_ratio", "score",
            "refer"} <= set(rows[0])
    referred = sum(r["refer"] == "True" for r in rows)
    assert referred == sum(float(r["score"]) > 0.05 for r in rows)
    expected = f"449 predictions, {referred} referred for human review (mutual_information > 0.05)"
    assert expected in capsys.readouterr().out
