"""A plugin whose code raises is named: entry point, distribution, the function, what regfw was
doing, and the fix (the plugin, or deselecting it); exit 2, and a run keeps (and names) its last
checkpoint or leaves nothing.

The plugins are real distributions (a ``*.dist-info`` with ``entry_points.txt`` on a temporary
``sys.path`` entry), discovered through ``importlib.metadata`` and registered by pluggy, as in
``test_plugin_failures.py``; the commands run in-process through ``regfw.cli.main.main``.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from plugin_dists import distribution

from regfw.cli.main import main
from regfw.registry.discovery import reset_plugin_manager

FRAGILE = '''
from dataclasses import dataclass

from torch import nn

import regfw
from regfw import Regularizer


class Fragile(Regularizer):
    """Adds nothing until global step 2, then raises (a bug that shows after some training)."""

    name = "fragile"

    def loss_term(self, step):
        if step.module is not None and step.module.global_step >= 2:
            raise FloatingPointError("the fragile term diverged")
        return None


class PlanBoom(Regularizer):
    name = "plan_boom"

    def plan(self, model, ctx):
        return self._layers(model)

    def _layers(self, model):
        raise KeyError("layer table missing")


@dataclass
class PickyConfig(regfw.InjectionConfig):
    hidden: float | None = None
    #: The method that raises (a plugin bug in that method).
    fail_in: str = ""


class Picky(regfw.InjectingRegularizer):
    """Dropout after hidden layers, raising in the method named by ``fail_in``."""

    name = "picky"
    Config = PickyConfig
    kinds = ("hidden",)

    def _maybe_fail(self, method):
        if self.config.fail_in == method:
            raise RuntimeError(method + " is broken")

    def rate_for(self, kind, ctx):
        self._maybe_fail("rate_for")
        return super().rate_for(kind, ctx)

    def make_module(self, kind, rate, item):
        self._maybe_fail("make_module")
        return nn.Dropout(rate)

    def apply(self, model, items):
        self._maybe_fail("apply")
        super().apply(model, items)

    def describe(self, model):
        self._maybe_fail("describe")
        return []


class ValBoom(Regularizer):
    """A Lightning callback that raises at the end of the first real validation."""

    name = "val_boom"

    def callbacks(self):
        import pytorch_lightning as pl

        class Boom(pl.Callback):
            def on_validation_epoch_end(self, trainer, pl_module):
                if not trainer.sanity_checking:
                    raise ArithmeticError("validation summary failed")

        return [Boom()]


class BadCheck(Regularizer):
    name = "bad_check"

    def check(self, config):
        return 1 / 0


@regfw.hookimpl
def regfw_register_regularizers(register):
    register(Fragile)
    register(PlanBoom)
    register(BadCheck)
    register(Picky)
    register(ValBoom)
'''

CLASSIFY = '''
import regfw


@regfw.hookimpl
def regfw_classify_module(module, path):
    raise RuntimeError("cannot classify " + type(module).__name__)
'''

CONFIG = """\
data: {train_fraction: 0.3, batch_size: 64}
model: {init_args: {hidden: [8]}}
regularizers: {dropout: {hidden: 0.2}}
uncertainty: {enabled: false}
trainer: {max_epochs: 2, enable_progress_bar: false, enable_model_summary: false}
"""


@pytest.fixture
def plugins(tmp_path, monkeypatch, fresh_plugins):
    """Two third-party distributions: regfw-fragile (two regularizers) and regfw-classify (a hook)."""
    site = tmp_path / "site"
    site.mkdir()
    distribution(site, "regfw-fragile", "fragile", "regfw_fragile", FRAGILE)
    distribution(site, "regfw-classify", "classify", "regfw_classify", CLASSIFY)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _config(root: Path, regularizers: str) -> Path:
    path = root / "c.yaml"
    path.write_text(CONFIG.replace("{dropout: {hidden: 0.2}}", regularizers))
    return path


def _one_line(capsys) -> str:
    lines = capsys.readouterr().err.splitlines()
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1, lines
    return errors[0]


def test_a_hook_that_raises_names_the_plugin_not_the_model(plugins, capsys, monkeypatch):
    monkeypatch.setenv("REGFW_LOAD_PLUGINS", "classify")
    reset_plugin_manager()
    cfg = _config(plugins, "{dropout: {hidden: 0.2}}")
    assert main(["plan", str(cfg)]) == 2
    line = _one_line(capsys)
    assert line.startswith("regfw plan: error: plugin 'classify' (entry point 'classify', distribution regfw-classify "
                           "1.0) raised RuntimeError: cannot classify ")
    assert "in regfw_classify_module(), while building the model and its plan." in line
    assert "The fix is in the plugin" in line and "leave it out with REGFW_LOAD_PLUGINS" in line
    assert "model.init_args" not in line
    assert main(["fit", str(cfg), "--run-dir", str(plugins / "run")]) == 2
    assert "plugin 'classify' (entry point 'classify', distribution regfw-classify 1.0)" in _one_line(capsys)
    assert not (plugins / "run").exists()


def test_a_regularizer_method_that_raises_names_plugin_method_and_how_to_deselect(plugins, capsys, monkeypatch):
    monkeypatch.setenv("REGFW_LOAD_PLUGINS", "fragile")
    reset_plugin_manager()
    cfg = _config(plugins, "{dropout: {hidden: 0.2}, plan_boom: {}}")
    assert main(["plan", str(cfg)]) == 2
    line = _one_line(capsys)
    assert line.startswith("regfw plan: error: plugin 'fragile' (entry point 'fragile', distribution regfw-fragile "
                           "1.0) raised KeyError: 'layer table missing' in PlanBoom.plan(), while building the model "
                           "and its plan.")
    assert line.endswith("deselect it: remove regularizers.bad_check / regularizers.fragile / regularizers.picky / "
                         "regularizers.plan_boom / regularizers.val_boom from the config.")


@pytest.mark.parametrize("method", ["rate_for", "make_module", "apply", "describe"])
def test_each_planning_method_that_raises_is_named(plugins, capsys, monkeypatch, method):
    """``make_module`` is called by regfw's own insertion code from the plugin's ``apply``: the
    function named is the one regfw called last, not the plugin's outer frame."""
    monkeypatch.setenv("REGFW_LOAD_PLUGINS", "fragile")
    reset_plugin_manager()
    cfg = _config(plugins, f"{{picky: {{hidden: 0.2, fail_in: {method}}}}}")
    assert main(["plan", str(cfg)]) == 2
    line = _one_line(capsys)
    assert line.startswith(f"regfw plan: error: plugin 'fragile' (entry point 'fragile', distribution regfw-fragile "
                           f"1.0) raised RuntimeError: {method} is broken in Picky.{method}(), while building the "
                           f"model and its plan.")


def test_a_plugin_raising_while_the_config_is_checked_is_named_by_the_cli(plugins, capsys, monkeypatch):
    monkeypatch.setenv("REGFW_LOAD_PLUGINS", "fragile")
    reset_plugin_manager()
    cfg = _config(plugins, "{dropout: {hidden: 0.2}, bad_check: {}}")
    for command in ("plan", "fit"):
        assert main([command, str(cfg)]) == 2
        line = _one_line(capsys)
        assert line.startswith(f"regfw {command}: error: plugin 'fragile' (entry point 'fragile', distribution "
                               f"regfw-fragile 1.0) raised ZeroDivisionError: division by zero in BadCheck.check(), "
                               f"during `regfw {command}`.")
    assert not (plugins / "runs").exists()


def test_a_plugin_raising_mid_training_names_the_step_and_the_checkpoint_kept(plugins, capsys, monkeypatch):
    monkeypatch.setenv("REGFW_LOAD_PLUGINS", "fragile")
    reset_plugin_manager()
    cfg = _config(plugins, "{dropout: {hidden: 0.2}, fragile: {}}")
    run = plugins / "run"
    assert main(["fit", str(cfg), "--run-dir", str(run), "run.checkpoint_every_n_steps=1"]) == 2
    line = _one_line(capsys)
    last = run / "checkpoints" / "last.ckpt"
    assert line.startswith("regfw fit: error: plugin 'fragile' (entry point 'fragile', distribution regfw-fragile 1.0) "
                           "raised FloatingPointError: the fragile term diverged in Fragile.loss_term(), in training "
                           "step 3 (epoch 0).")
    assert (f"The run directory is kept; its last checkpoint is {last}: once the plugin is fixed, continue with "
            f"`regfw fit {cfg} --resume {last}`.") in line
    assert last.is_file()


def test_a_plugin_raising_before_the_first_checkpoint_leaves_nothing(plugins, capsys, monkeypatch):
    monkeypatch.setenv("REGFW_LOAD_PLUGINS", "fragile")
    reset_plugin_manager()
    cfg = _config(plugins, "{dropout: {hidden: 0.2}, fragile: {}}")
    run = plugins / "run"
    assert main(["fit", str(cfg), "--run-dir", str(run)]) == 2  # checkpoints only at epoch ends: none yet
    line = _one_line(capsys)
    assert "in Fragile.loss_term(), in training step 3 (epoch 0). No checkpoint was written before it, so nothing " \
           "of the run was kept." in line
    assert not run.exists()


def test_the_models_own_failure_is_still_the_models(plugins, capsys, monkeypatch):
    """A plugin on the stack does not take the blame for the model's forward (the walk's rule)."""
    monkeypatch.setenv("REGFW_LOAD_PLUGINS", "fragile")
    reset_plugin_manager()
    cfg = _config(plugins, "{dropout: {hidden: 0.2}, fragile: {}}")
    assert main(["plan", str(cfg), "model.init_args.in_features=5"]) == 2
    line = _one_line(capsys)
    assert line.startswith("regfw plan: error: model: building 'mlp'") and "plugin" not in line


def test_a_plugin_package_is_named_for_code_in_any_of_its_modules(tmp_path, monkeypatch, fresh_plugins, capsys):
    """The entry point is ``regfw_split.plugin``; the class that raises lives in ``regfw_split.regs``."""
    package = tmp_path / "regfw_split"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "regs.py").write_text("from regfw import Regularizer\n\n\nclass Split(Regularizer):\n"
                                     "    name = 'split'\n\n    def plan(self, model, ctx):\n"
                                     "        raise ValueError('split plan failed')\n")
    (package / "plugin.py").write_text("import regfw\nfrom regfw_split.regs import Split\n\n\n@regfw.hookimpl\n"
                                       "def regfw_register_regularizers(register):\n    register(Split)\n")
    distribution(tmp_path, "regfw-split", "split", "regfw_split.plugin", None, version="2.0")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("REGFW_LOAD_PLUGINS", "split")
    monkeypatch.chdir(tmp_path)
    reset_plugin_manager()
    cfg = _config(tmp_path, "{dropout: {hidden: 0.2}, split: {}}")
    assert main(["plan", str(cfg)]) == 2
    assert _one_line(capsys).startswith("regfw plan: error: plugin 'split' (entry point 'split', distribution "
                                        "regfw-split 2.0) raised ValueError: split plan failed in Split.plan(), while "
                                        "building the model and its plan.")


def test_a_plugin_callback_raising_during_validation_says_so(plugins, capsys, monkeypatch):
    monkeypatch.setenv("REGFW_LOAD_PLUGINS", "fragile")
    reset_plugin_manager()
    cfg = _config(plugins, "{dropout: {hidden: 0.2}, val_boom: {}}")
    assert main(["fit", str(cfg), "--run-dir", str(plugins / "run")]) == 2
    line = _one_line(capsys)
    assert line.startswith("regfw fit: error: plugin 'fragile' (entry point 'fragile', distribution regfw-fragile 1.0) "
                           "raised ArithmeticError: validation summary failed in "
                           "ValBoom.callbacks.<locals>.Boom.on_validation_epoch_end(), during validation after "
                           "training step 7 (epoch 0).")
