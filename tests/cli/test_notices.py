"""Inputs that are valid but turn a feature off are said once, not accepted silently: MC dropout
uncertainty left enabled on a run whose model has no active dropout (``regularizers: null``, or
every dropout rate 0) trains, with one warning that names both fixes, and reports no MC metrics."""
from __future__ import annotations

import warnings

import pytest

from regfw.cli.main import main

CONFIG = """
data: {train_fraction: 0.1, batch_size: 64}
model: {init_args: {hidden: [8]}}
regularizers: {dropout: {hidden: 0.2}}
uncertainty: {samples: 3, plots: false}
trainer: {max_epochs: 1, enable_progress_bar: false, enable_model_summary: false}
"""
NOTICE = ("regfw: uncertainty.enabled is true, but the model has no active dropout (no dropout regularizer, or all "
          "its rates are 0): MC dropout uncertainty is off for this run. Select a dropout regularizer, or set "
          "uncertainty.enabled: false.")


@pytest.mark.parametrize("overrides", [["regularizers=null"],
                                       ["regularizers.dropout.input=0", "regularizers.dropout.hidden=0"]],
                         ids=["no regularizers", "all rates 0"])
def test_mc_dropout_without_any_dropout_trains_and_says_so_once(tmp_path, monkeypatch, capsys, overrides):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(CONFIG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["fit", "c.yaml", "--run-dir", "run", *overrides]) == 0
    assert [str(w.message) for w in caught if "uncertainty.enabled" in str(w.message)] == [NOTICE]
    out = capsys.readouterr().out
    assert "  val_acc  " in out and "mc/" not in out  # no MC metrics
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
