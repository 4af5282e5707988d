"""``regfw plan``: a snapshot of the printed plan, and the printed plan being the applied one.

Set ``REGFW_UPDATE_SNAPSHOTS=1`` to rewrite ``tests/snapshots/`` after an intended change, and
review the diff.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

from regfw.build.models import BUILTIN_MODELS
from regfw.cli.main import main
from regfw.train.module import RegularizedModule

SNAPSHOTS = Path(__file__).parents[1] / "snapshots"

CONFIG = """\
seed: 0
data: {name: digits, batch_size: 32, train_fraction: 0.5}
model: {name: mlp}
regularizers:
  dropout: {input: 0.15}    # explicit input rate; hidden rates from the policy
  drop_path: {}             # the MLP has no residual add: a warning line
trainer: {max_epochs: 1}
"""


def check_snapshot(name: str, text: str) -> None:
    path = SNAPSHOTS / name
    if os.environ.get("REGFW_UPDATE_SNAPSHOTS") == "1":
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed; rerun with REGFW_UPDATE_SNAPSHOTS=1 if intended"


def test_plan_of_the_builtin_mlp_matches_the_snapshot(tmp_path, capsys):
    config = tmp_path / "mlp.yaml"
    config.write_text(CONFIG)
    assert main(["plan", str(config)]) == 0
    out, err = capsys.readouterr()
    check_snapshot("plan_mlp.txt", out)
    assert "UserWarning" not in err  # plan warnings are printed once, in the plan


def test_a_config_error_in_plan_names_both_variants(tmp_path, capsys):
    config = tmp_path / "cnn.yaml"
    config.write_text(CONFIG.replace("model: {name: mlp}", "model: {name: cnn}")
                      .replace("drop_path: {}", "spatial_dropout: {}"))
    assert main(["plan", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("regfw plan: error: regularizers: 'dropout' and 'spatial_dropout' are both dropout "
                          "regularizers for 'conv' layers")


def test_the_printed_plan_is_what_is_applied():
    torch.manual_seed(0)
    model = BUILTIN_MODELS["cnn"](in_features=64, num_outputs=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = RegularizedModule(model, regularizers={"dropout": {"conv": 0, "hidden": 0},
                                                        "dropblock": {"block_size": 3},
                                                        "gaussian_dropout": {"input": 0, "conv": 0, "hidden": 0.3}},
                                   n_examples=500, example_input=torch.zeros(2, 64))
    rows = module.plan.rows()
    assert len(rows) == 4
    for row in rows:
        line = [ln for ln in module.plan.format().splitlines() if ln.startswith(row.regularizer) and row.path in ln]
        assert line and f"{row.rate:g}" in line[0] and row.reason in line[0]
        name = ("regfw_input_" if row.action == "before" else "regfw_") + row.regularizer
        inserted = model.get_submodule(row.anchor)._modules[name]
        assert inserted.p == row.rate
    injected = sorted(n for n, _ in model.named_modules() if n.split(".")[-1].startswith("regfw_"))
    assert injected == ["classifier.2.regfw_gaussian_dropout", "features.0.regfw_input_dropout",
                        "features.2.regfw_dropblock", "features.5.regfw_dropblock"]


def test_notes_are_shown_but_not_counted_as_changes():
    from models_zoo import SmallResNet

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = RegularizedModule(SmallResNet(), regularizers={"drop_path": {}}, example_input=torch.zeros(2, 3, 8, 8))
    text = module.plan.format()
    assert text.splitlines()[0].endswith("3 change(s)")
    assert "drop_path    layer1.0  residual  drop_path  0          note" in text
    assert "linear depth schedule, block 1 of 4; residual add 'add'; rate 0, nothing inserted" in text


@pytest.mark.parametrize("name", ["plan_mlp.txt"])
def test_snapshots_exist(name):
    assert (SNAPSHOTS / name).is_file()
