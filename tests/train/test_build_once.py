"""The regularizer section is turned into objects once per command: `regfw fit` and `regfw plan`
build each selected regularizer one time (validation, plan and training share the objects)."""
from __future__ import annotations

import textwrap

import pytest

from regfw.cli.main import main

PLUGIN = '''
from dataclasses import dataclass

import regfw
from regfw import Regularizer

BUILT = []


@dataclass
class CountedConfig:
    strength: float = 1e-4


class Counted(Regularizer):
    """A penalty that records every time an object of it is made."""

    name = "counted"
    Config = CountedConfig

    def __init__(self, config=None):
        super().__init__(config)
        BUILT.append(self)

    def penalty(self, model):
        return self.config.strength * sum((p ** 2).sum() for p in model.parameters())


@regfw.hookimpl
def regfw_register_regularizers(register):
    register(Counted)
'''

CONFIG = """
seed: 0
data: {name: digits, batch_size: 64, train_fraction: 0.1}
model: {name: mlp, init_args: {hidden: [16]}}
regularizers: {dropout: {hidden: 0.2}, counted: {strength: 0.001}}
uncertainty: {enabled: false}
trainer: {max_epochs: 1, enable_progress_bar: false, enable_model_summary: false}
run: {dir: runs}
"""


@pytest.fixture
def counted(tmp_path, monkeypatch):
    from regfw.registry.discovery import register_plugin, unregister_plugin

    (tmp_path / "counted_plugin.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import counted_plugin

    counted_plugin.BUILT.clear()
    register_plugin(counted_plugin, "counted", distribution="counted-plugin", version="0.1")
    (tmp_path / "c.yaml").write_text(CONFIG)
    try:
        yield counted_plugin
    finally:
        unregister_plugin("counted")


def test_fit_builds_each_regularizer_once_and_trains_with_that_object(counted, capsys):
    assert main(["fit", "c.yaml"]) == 0
    assert len(counted.BUILT) == 1
    # the one object is the one the training used: its config came from the file
    assert counted.BUILT[0].config.strength == 0.001


def test_plan_builds_each_regularizer_once_and_lists_what_it_does(counted, capsys):
    assert main(["plan", "c.yaml"]) == 0
    assert len(counted.BUILT) == 1
    out = capsys.readouterr().out
    assert "dropout" in out
    # a regularizer that changes no layer and describes nothing is still listed, with what it does
    assert "counted: no layer changes; adds a penalty on the model to the loss" in out
