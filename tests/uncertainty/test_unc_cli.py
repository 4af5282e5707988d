"""Calibration and OOD through `regfw fit` and `regfw rank`: metrics.csv, checkpoint, rank's temperature."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def test_fit_calibrates_saves_the_temperature_and_rank_uses_it(tmp_path, run_cli):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text((ROOT / "templates" / "demo.yaml").read_text())
    result = run_cli("fit", str(cfg), "trainer.max_epochs=2", "uncertainty.samples=5", "uncertainty.every_n_epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    run = next((tmp_path / "runs").iterdir())
    with open(run / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("cal/temperature")]
    assert len(rows) == 2  # both epochs
    last = rows[-1]
    for key in ("cal/nll_before", "cal/nll_after", "cal/ece_before", "cal/ece_after", "cal/det_temperature",
                "ood/auroc_mutual_information", "ood/fpr95_energy", "mc/aurc", "mc/augrc", "mc/risk_95"):
        assert last.get(key), key
    # fitted on held-out data and scored on validation: the NLL is not worse after
    assert float(last["cal/nll_after"]) <= float(last["cal/nll_before"]) + 1e-6
    assert float(last["ood/auroc_entropy"]) > 0.5
    assert sorted(p.name for p in (run / "plots" / "epoch=001").iterdir()) == [
        "ood_hist.svg", "referral.svg", "reliability.svg", "risk_coverage.svg", "score_hist.svg"]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    temperature = ckpt["regfw_calibration"]["temperature"]
    assert temperature == pytest.approx(float(last["cal/temperature"]))

    # rank reads the temperature: its scores are those of the calibrated predictive
    from regfw.build.factory import build_datamodule
    from regfw.cli.rank import load_module, rank_checkpoint
    from regfw.config.schema import load_config
    from regfw.uncertainty import rank
    from regfw.uncertainty.heldout import prepare_heldout

    ckpt_path = str(run / "checkpoints" / "last.ckpt")
    ranked = rank_checkpoint(str(cfg), ckpt_path, k=20, samples=5)
    c = load_config(str(cfg))
    dm = build_datamodule(c.data, seed=c.seed)
    prepare_heldout(dm, c.uncertainty, c.seed)
    module = load_module(ckpt_path)
    kw = dict(acquisition="bald", k=20, samples=5, seed=c.uncertainty.seed)
    calibrated = rank(module, dm.val_dataloader(), temperature=temperature, **kw)
    raw = rank(module, dm.val_dataloader(), **kw)
    assert torch.equal(ranked.indices, calibrated.indices) and torch.allclose(ranked.scores, calibrated.scores)
    assert not torch.allclose(raw.scores, calibrated.scores)
    assert int(ranked.indices.max()) < dm.x_val.shape[0]  # the in-distribution validation split (digits 0-4)


def test_calibration_on_regression_is_a_config_error(tmp_path, run_cli):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text((ROOT / "templates" / "demo.yaml").read_text())
    result = run_cli("fit", str(cfg), "data.name=diabetes", "uncertainty.ood=null", "trainer.max_epochs=1")
    assert result.returncode == 2
    assert "uncertainty.calibration.enabled: temperature scaling calibrates classifiers" in result.stderr
