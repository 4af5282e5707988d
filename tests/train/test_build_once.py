"""Build once: a config is plain data, and one function turns it into the objects a run uses.

`regfw fit` and `regfw plan` build the regularizer objects the plan and the training use once, in
regfw.build.parts.build_parts (which both use), and each sees the whole config (`check`). Loading
the config validates and completes each regularizer's settings as plain data and runs its checks on
an object that nothing keeps: the config carries no runtime object."""
from __future__ import annotations

import dataclasses
import textwrap

import pytest

from regfw.cli.main import main

PLUGIN = '''
from dataclasses import dataclass

import regfw
from regfw import Regularizer

BUILT = []
USED = []


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
        if self not in USED:
            USED.append(self)
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
    counted_plugin.USED.clear()
    register_plugin(counted_plugin, "counted", distribution="counted-plugin", version="0.1")
    (tmp_path / "c.yaml").write_text(CONFIG)
    try:
        yield counted_plugin
    finally:
        unregister_plugin("counted")


def test_fit_builds_each_regularizer_once_and_trains_with_that_object(counted, capsys):
    assert main(["fit", "c.yaml"]) == 0
    # validation's object checked the config; the run built its own once and trained with it only
    assert len(counted.BUILT) == 2
    assert counted.USED == [counted.BUILT[1]]
    assert counted.BUILT[1].config.strength == 0.001  # its config came from the file


def test_the_config_carries_no_runtime_object(counted):
    from regfw.build.fit import build_fit
    from regfw.config.schema import load_config

    cfg = load_config("c.yaml")
    assert len(counted.BUILT) == 1  # validation's, which nothing keeps
    assert cfg.regularizers["counted"] == {"strength": 0.001}
    plain = (str, int, float, bool, type(None))

    def only_plain(value):
        if dataclasses.is_dataclass(value):
            return all(only_plain(getattr(value, f.name)) for f in dataclasses.fields(value))
        if isinstance(value, dict):
            return all(isinstance(k, str) and only_plain(v) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return all(only_plain(v) for v in value)
        return isinstance(value, plain)

    assert only_plain(cfg)
    built = build_fit(cfg)
    assert len(counted.BUILT) == 2
    (obj,) = [r for r in built.module.regularizers if r.name == "counted"]
    assert obj is counted.BUILT[-1]
    assert all(a is b for a, b in zip(built.parts.regularizers, built.module.regularizers, strict=True))
    assert built.module.plan is built.parts.plan  # the module took the plan it was given, as it was


def test_plan_builds_each_regularizer_once_and_lists_what_it_does(counted, capsys):
    assert main(["plan", "c.yaml"]) == 0
    assert len(counted.BUILT) == 2  # validation's, and the one the plan was made with
    out = capsys.readouterr().out
    assert "dropout" in out
    # a regularizer that changes no layer and describes nothing is still listed, with what it does
    assert "counted: no layer changes; adds a penalty on the model to the loss" in out
