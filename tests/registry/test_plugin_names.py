"""Plugins that register one regularizer name: each stays usable by its qualified name ``DIST:NAME``.

The plugins are real distributions (a ``*.dist-info`` with an ``entry_points.txt`` and a module on a
temporary ``sys.path`` entry) found by ``importlib.metadata`` and loaded by pluggy, like the two
third-party plugins written before the built-ins took their names: ``regfw-rdrop`` (``rdrop``)
and ``regfw-concrete-dropout`` (``concrete_dropout``).
"""
from __future__ import annotations

import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from plugin_dists import distribution

from regfw.cli.main import main
from regfw.errors import ConfigError
from regfw.registry.discovery import (
    PluginWarning,
    get_plugin_manager,
    plugin_failures,
    plugin_infos,
    register_plugin,
    reset_plugin_manager,
    unregister_plugin,
)
from regfw.registry.regularizers import build_regularizers, get_registry, section_key

RDROP = """
from dataclasses import dataclass

import regfw
from regfw import Regularizer


@dataclass
class RDropConfig:
    alpha: float = 1.0


class RDrop(Regularizer):
    name = "rdrop"
    description = "third-party R-Drop: alpha times the squared logits"
    Config = RDropConfig

    def loss_term(self, step):
        return self.config.alpha * 1e-3 * step.outputs.pow(2).mean()


@regfw.hookimpl
def regfw_register_regularizers(register):
    register(RDrop)
"""

CONCRETE = """
from dataclasses import dataclass
from typing import Optional

import torch

import regfw
from regfw import InjectingRegularizer, InjectionConfig
from regfw.placement.kinds import HIDDEN


@dataclass
class HandConfig(InjectionConfig):
    hidden: Optional[float] = 0.25


class HandConcrete(InjectingRegularizer):
    name = "concrete_dropout"
    variant = "hand_written_concrete"
    Config = HandConfig
    kinds = (HIDDEN,)

    def make_module(self, kind, rate, item):
        return torch.nn.Dropout(rate)


@regfw.hookimpl
def regfw_register_regularizers(register):
    register(HandConcrete)
"""

NAMED = """
import regfw
from regfw import Regularizer


class {cls}(Regularizer):
    name = "{reg}"
    description = "{cls}'s {reg}"


@regfw.hookimpl
def regfw_register_regularizers(register):
    register({cls})
"""

CONFIG = """\
data: {{name: digits, train_fraction: 0.1, batch_size: 64}}
model: {{name: mlp, init_args: {{hidden: [8]}}}}
regularizers:
  {regs}
uncertainty: {{enabled: false}}
trainer: {{max_epochs: 1, limit_train_batches: 2, limit_val_batches: 1, enable_progress_bar: false,
          enable_model_summary: false}}
"""



#: The plugin modules these tests import, forgotten after each test (other tests install their own
#: modules of some of these names).
MODULES = ("regfw_rdrop", "regfw_concrete_dropout", "regfw_gumbel_first", "regfw_alpha", "regfw_beta")


@pytest.fixture(autouse=True)
def forget_modules():
    yield
    for name in MODULES:
        sys.modules.pop(name, None)


@pytest.fixture
def installed(tmp_path, monkeypatch, fresh_plugins):
    """The two hand-written plugins whose names the built-ins took since, installed by path."""
    site = tmp_path / "site"
    site.mkdir()
    distribution(site, "regfw-rdrop", "rdrop", "regfw_rdrop", RDROP)
    distribution(site, "regfw-concrete-dropout", "concrete_dropout", "regfw_concrete_dropout", CONCRETE)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("REGFW_LOAD_PLUGINS", raising=False)
    monkeypatch.chdir(tmp_path)
    reset_plugin_manager()
    return tmp_path


def _config(tmp: Path, regs: str, name: str = "c.yaml") -> str:
    (tmp / name).write_text(CONFIG.format(regs=regs))
    return str(tmp / name)


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_both_load_without_a_warning_and_plugins_lists_both_and_exits_0(installed, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginWarning)  # a shared name is no failure
        get_plugin_manager()
    assert plugin_failures() == []
    keys = {i.name: i for i in plugin_infos()}
    assert keys["regfw-rdrop:rdrop"].distribution == "regfw-rdrop" and keys["regfw:rdrop"].builtin
    code, out, err = _run(["plugins", "--check"], capsys)
    assert code == 0, err
    assert "regfw-rdrop:rdrop 1.0 (regfw-rdrop; module regfw_rdrop)" in out
    assert "regfw-concrete-dropout:concrete_dropout 1.0 (regfw-concrete-dropout; module regfw_concrete_dropout)" in out
    assert "regfw-rdrop:rdrop: third-party R-Drop: alpha times the squared logits" in out
    assert "shared name 'rdrop': select regfw:rdrop or regfw-rdrop:rdrop in regularizers:" in out
    assert ("shared name 'concrete_dropout': select regfw:concrete_dropout or "
            "regfw-concrete-dropout:concrete_dropout in regularizers:") in out
    assert "uninstall" not in (out + err).lower()


def test_an_old_config_with_the_bare_shared_name_is_one_line_naming_both_choices(installed, capsys):
    cfg = _config(installed, "concrete_dropout: {}")
    for command in ("plan", "fit"):
        code, out, err = _run([command, cfg], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err
        assert lines[0].startswith(f"regfw {command}: error: regularizers.concrete_dropout: the regularizer name "
                                   "'concrete_dropout' is ambiguous: 2 installed plugins register it, "
                                   "'regfw:concrete_dropout' (built-in, regfw_plugins.concrete_dropout.")
        assert ("'regfw-concrete-dropout:concrete_dropout' (distribution regfw-concrete-dropout, "
                "regfw_concrete_dropout.HandConcrete)") in lines[0]
        assert ("regularizers: {regfw:concrete_dropout: {...}}; regularizers: "
                "{regfw-concrete-dropout:concrete_dropout: {...}}") in lines[0]
        assert "uninstall" not in err.lower()
    assert not (installed / "runs").exists()


def test_each_is_selected_by_its_qualified_name(installed, capsys):
    code, out, err = _run(["plan", _config(installed, "regfw-concrete-dropout:concrete_dropout: {hidden: 0.3}")],
                          capsys)
    assert code == 0, err
    assert "hand_written_concrete" in out and "1 change(s)" in out
    assert ("concrete_dropout: selected as regfw-concrete-dropout:concrete_dropout "
            "(regfw_concrete_dropout.HandConcrete)") in out
    code, out, err = _run(["plan", _config(installed, "regfw:concrete_dropout: {}")], capsys)
    assert code == 0, err
    assert "hand_written_concrete" not in out and "learned" in out  # the built-in's rows: learned rates
    # the distribution's name in any spelling pip accepts
    code, out, err = _run(["plan", _config(installed, "Regfw_Concrete.Dropout:concrete_dropout: {}")], capsys)
    assert code == 0 and "hand_written_concrete" in out, err


def test_a_fit_keeps_the_qualified_name_in_its_config_and_checkpoint(installed, capsys):
    from regfw.train.module import RegularizedModule

    cfg = _config(installed, "regfw-rdrop:rdrop: {alpha: 1.0}")
    code, out, err = _run(["fit", cfg, "regularizers.regfw-rdrop:rdrop.alpha=2", "--run-dir", "run"], capsys)
    assert code == 0, err
    assert "regfw-rdrop:rdrop:\n    alpha: 2.0" in (installed / "run" / "config.yaml").read_text()
    ckpt_path = installed / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=False)
    assert ckpt["hyper_parameters"]["regularizers"] == {"regfw-rdrop:rdrop": {"alpha": 2.0}}
    assert ckpt["regfw"]["plugins"]["regfw-rdrop:rdrop"]["distribution"] == "regfw-rdrop"
    loaded = RegularizedModule.load_from_checkpoint(ckpt_path)
    (reg,) = loaded.regularizers
    assert type(reg).__module__ == "regfw_rdrop" and reg.name == "rdrop" and reg.config.alpha == 2.0
    assert reg.selected_as == "regfw-rdrop:rdrop"


def test_resuming_compares_regularizers_by_the_plugin_they_select_not_by_spelling(installed, capsys):
    # fitted as regfw-rdrop:rdrop; resumed under another spelling pip accepts (the checkpoint then keeps that
    # spelling), then with the built-in of that name: another plugin, refused
    cfg = _config(installed, "regfw-rdrop:rdrop: {alpha: 1.0}")
    code, out, err = _run(["fit", cfg, "--run-dir", "run"], capsys)
    assert code == 0, err
    ckpt = str(installed / "run" / "checkpoints" / "last.ckpt")
    same = _config(installed, "Regfw_Rdrop:rdrop: {alpha: 1.0}")
    code, out, err = _run(["fit", same, "--resume", ckpt, "trainer.max_epochs=2"], capsys)
    assert code == 0, err
    other = _config(installed, "regfw:rdrop: {alpha: 1.0}")
    code, out, err = _run(["fit", other, "--resume", ckpt, "trainer.max_epochs=3"], capsys)
    assert code == 2 and "regularizers.Regfw_Rdrop:rdrop is {'alpha': 1.0} in the checkpoint but not in" in err, err


def test_objects_made_in_python_are_recorded_under_a_name_that_selects_them_again(installed):
    registry = get_registry()
    third_party = registry.get("regfw-rdrop:rdrop").cls()
    third_party.name = "rdrop"
    builtin = registry.get("regfw:rdrop").cls()
    assert section_key(third_party) == "regfw-rdrop:rdrop" and section_key(builtin) == "regfw:rdrop"
    assert section_key(registry.get("dropout").cls()) == "dropout"  # a name nobody shares stays bare
    with pytest.raises(ConfigError, match=r"^regularizers\.rdrop: the regularizer name 'rdrop' is ambiguous"):
        build_regularizers({"rdrop": {}})


def test_one_run_takes_one_regularizer_of_a_name(installed, capsys):
    code, out, err = _run(["plan", _config(installed, "regfw:rdrop: {}\n  regfw-rdrop:rdrop: {}")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert ("regularizers.regfw-rdrop:rdrop: 'regfw-rdrop:rdrop' and 'regfw:rdrop' both select a regularizer "
            "named 'rdrop'") in err
    code, out, err = _run(["plan", _config(installed, "dropout: {}\n  regfw:dropout: {}")], capsys)
    assert code == 2 and "'regfw:dropout' and 'dropout' both select a regularizer named 'dropout'" in err, err


def test_a_builtin_added_later_never_takes_over_a_name_a_plugin_uses(tmp_path, monkeypatch, fresh_plugins, capsys):
    source = NAMED.format(cls="Gumbel", reg="gumbel_noise")
    distribution(tmp_path, "regfw-gumbel", "gumbel", "regfw_gumbel_first", source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("REGFW_LOAD_PLUGINS", raising=False)
    reset_plugin_manager()
    assert type(build_regularizers({"gumbel_noise": {}})[0]).__module__ == "regfw_gumbel_first"
    # a later regfw ships a built-in of that name: registered as the built-in distribution is
    later = textwrap.dedent(NAMED.format(cls="BuiltinGumbel", reg="gumbel_noise"))
    namespace: dict = {"__name__": "regfw_plugins_later"}
    exec(compile(later, "regfw_plugins_later", "exec"), namespace)
    module = type(textwrap)("regfw_plugins_later")
    module.__dict__.update(namespace)
    monkeypatch.setitem(sys.modules, "regfw_plugins_later", module)
    register_plugin(module, "gumbel_builtin", distribution="regfw", builtin=True)
    try:
        with pytest.raises(ConfigError) as err:
            build_regularizers({"gumbel_noise": {}})
        assert ("'gumbel_noise' is ambiguous: 2 installed plugins register it, 'regfw:gumbel_noise' (built-in, "
                "regfw_plugins_later.BuiltinGumbel) or 'regfw-gumbel:gumbel_noise' (distribution regfw-gumbel, "
                "regfw_gumbel_first.Gumbel)") in str(err.value)
        assert type(build_regularizers({"regfw-gumbel:gumbel_noise": {}})[0]).__module__ == "regfw_gumbel_first"
        assert type(build_regularizers({"regfw:gumbel_noise": {}})[0]).__module__ == "regfw_plugins_later"
        code, out, _ = _run(["plugins", "--check"], capsys)
        assert code == 0 and "shared name 'gumbel_noise'" in out
    finally:
        unregister_plugin("gumbel_builtin")


@pytest.fixture
def twins(tmp_path, monkeypatch, fresh_plugins):
    """Two third-party distributions declaring one entry-point name and one regularizer name."""
    distribution(tmp_path, "regfw-alpha", "gumbel", "regfw_alpha", NAMED.format(cls="Alpha", reg="gumbel"))
    distribution(tmp_path, "regfw-beta", "gumbel", "regfw_beta", NAMED.format(cls="Beta", reg="gumbel"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("REGFW_LOAD_PLUGINS", raising=False)
    reset_plugin_manager()
    return tmp_path


def test_two_third_party_plugins_of_one_name_both_load_under_qualified_names(twins, monkeypatch):
    keys = {i.name for i in plugin_infos()}
    assert {"regfw-alpha:gumbel", "regfw-beta:gumbel"} <= keys and "gumbel" not in keys
    assert plugin_failures() == []
    with pytest.raises(ConfigError, match=r"'regfw-alpha:gumbel' \(distribution regfw-alpha, regfw_alpha\.Alpha\) "
                                          r"or 'regfw-beta:gumbel' \(distribution regfw-beta, regfw_beta\.Beta\)"):
        build_regularizers({"gumbel": {}})
    assert type(build_regularizers({"regfw-beta:gumbel": {}})[0]).__name__ == "Beta"
    # REGFW_LOAD_PLUGINS: DIST:NAME loads that one (the bare name is then no longer shared) ...
    monkeypatch.setenv("REGFW_LOAD_PLUGINS", "Regfw_Beta:gumbel")
    reset_plugin_manager()
    assert type(build_regularizers({"gumbel": {}})[0]).__name__ == "Beta"
    assert "regfw-alpha:gumbel" not in {i.name for i in plugin_infos()}
    # ... NAME loads every distribution declaring it
    monkeypatch.setenv("REGFW_LOAD_PLUGINS", "gumbel")
    reset_plugin_manager()
    assert {"regfw-alpha:gumbel", "regfw-beta:gumbel"} <= {i.name for i in plugin_infos()}
    # a distribution that is not installed: reported with the installed names
    monkeypatch.setenv("REGFW_LOAD_PLUGINS", "regfw-gamma:gumbel")
    reset_plugin_manager()
    with pytest.warns(PluginWarning) as caught:
        get_plugin_manager()
    (message,) = [str(w.message) for w in caught]
    assert message.startswith("REGFW_LOAD_PLUGINS names 'regfw-gamma:gumbel', which no installed plugin declares. "
                              "Installed third-party plugins: regfw-alpha:gumbel, regfw-beta:gumbel.")


def test_qualified_names_that_select_nothing_say_what_to_write(twins):
    registry = get_registry()
    cases = {
        "regfw-alpha:gumbl": "distribution 'regfw-alpha' provides no regularizer 'gumbl'. Did you mean "
                             "'regfw-alpha:gumbel'? It provides: regfw-alpha:gumbel.",
        "regfw-gamma:gumbel": "no installed plugin distribution is called 'regfw-gamma'; distributions providing "
                              "regularizers: regfw, regfw-alpha, regfw-beta. 'gumbel' is installed as "
                              "regfw-alpha:gumbel and regfw-beta:gumbel.",
        ":gumbel": "':gumbel' has an empty distribution; a qualified regularizer name is DIST:NAME",
        "regfw-beta:": "'regfw-beta:' has an empty name; a qualified regularizer name is DIST:NAME, one ':' "
                       "between the distribution that provides it and the regularizer's name (e.g. "
                       "'regfw-beta:gumbel')",
        "regfw:beta:gumbel": "'regfw:beta:gumbel' has more than one ':'",
    }
    for name, expected in cases.items():
        with pytest.raises(ConfigError) as err:
            registry.get(name)
        assert str(err.value).startswith(f"regularizers.{name}: {expected}"), str(err.value)


LIGHTNING_CLI = """
from pytorch_lightning.cli import LightningCLI
from regfw.build.datasets import DigitsDataModule
from regfw.train.module import RegularizedModule

cli = LightningCLI(RegularizedModule, DigitsDataModule, run=False, save_config_kwargs={"overwrite": True})
cli.trainer.fit(cli.model, datamodule=cli.datamodule)
print("REGS", [(type(r).__module__, r.name, r.selected_as, r.config.alpha) for r in cli.model.regularizers])
print("HPARAMS", dict(cli.model.hparams["regularizers"]))
"""

LIGHTNING_CONFIG = """
seed_everything: 0
trainer: {max_epochs: 1, limit_train_batches: 2, limit_val_batches: 1, logger: false, enable_progress_bar: false,
          enable_checkpointing: false}
model:
  model_config: {name: mlp, init_args: {in_features: 64, num_outputs: 10, hidden: [8]}}
  regularizers: {regfw-rdrop:rdrop: {alpha: 2.0}}
  n_examples: 1347
data: {batch_size: 64}
"""


@pytest.mark.slow
def test_lightning_cli_selects_a_regularizer_by_its_qualified_name(installed):
    import os
    import subprocess

    (installed / "cli.py").write_text(LIGHTNING_CLI)
    (installed / "cfg.yaml").write_text(LIGHTNING_CONFIG)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(installed / "site")}
    proc = subprocess.run([sys.executable, "cli.py", "--config", "cfg.yaml"], cwd=installed, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REGS [('regfw_rdrop', 'rdrop', 'regfw-rdrop:rdrop', 2.0)]" in proc.stdout, proc.stdout
    assert "HPARAMS {'regfw-rdrop:rdrop': {'alpha': 2.0}}" in proc.stdout, proc.stdout


TWICE = """
import regfw
from regfw import Regularizer


class One(Regularizer):
    name = "twice"


class Two(Regularizer):
    name = "twice"


@regfw.hookimpl
def regfw_register_regularizers(register):
    register(One)
    register(Two)
"""


def test_a_plugin_refused_at_registration_breaks_only_the_configs_that_select_it(tmp_path, monkeypatch,
                                                                                 fresh_plugins, capsys):
    distribution(tmp_path, "regfw-twice", "twice", "regfw_twice_plugin", TWICE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("REGFW_LOAD_PLUGINS", raising=False)
    monkeypatch.chdir(tmp_path)
    reset_plugin_manager()
    try:
        code, out, err = _run(["plugins", "--check"], capsys)  # it lists the failure instead of warning
        assert code == 1 and "dropout" in out
        assert ("regfw plugins: error: plugin 'twice' (entry point 'twice = regfw_twice_plugin' of distribution "
                "regfw-twice 1.0) was refused: regularizer 'twice' is registered twice by one provider "
                "(regfw-twice)") in err
        code, out, err = _run(["plan", _config(tmp_path, "dropout: {}")], capsys)
        assert code == 0 and "plan:" in out
        code, out, err = _run(["plan", _config(tmp_path, "twice: {}")], capsys)
        assert code == 2 and err.count("\n") == 1
        assert "regularizers.twice: regularizer 'twice' is not available: plugin 'twice' (entry point" in err
    finally:
        sys.modules.pop("regfw_twice_plugin", None)


def test_no_failure_message_tells_a_user_to_uninstall_regfw():
    from regfw.registry.discovery import PluginFailure

    builtin = PluginFailure("dropout", "import", "failed to import: ImportError: x", "dropout = regfw_plugins.dropout",
                            "regfw", "0.1.0")
    assert "uninstall" not in builtin.message().lower() and "reinstall regfw" in builtin.message()
    third = PluginFailure("x", "import", "failed to import: ImportError: x", "x = regfw_x", "regfw-x", "1.0")
    assert third.message().endswith("Fix or uninstall it, or leave it out with REGFW_LOAD_PLUGINS.")
