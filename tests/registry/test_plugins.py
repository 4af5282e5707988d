"""Plugin discovery through pluggy and the ``regfw`` entry-point group."""
from __future__ import annotations

import sys
import textwrap
import types
from dataclasses import dataclass

import pytest

import regfw
from regfw.errors import ConfigError, PluginError
from regfw.extend.regularizer import Regularizer
from regfw.registry.discovery import (
    PluginWarning,
    get_plugin_manager,
    plugin_infos,
    register_plugin,
    reset_plugin_manager,
    unregister_plugin,
)
from regfw.registry.regularizers import get_registry


def _plugin_module(name: str, body: str, monkeypatch) -> types.ModuleType:
    module = types.ModuleType(name)
    monkeypatch.setitem(sys.modules, name, module)
    module.__dict__.update({"regfw": regfw, "Regularizer": Regularizer, "dataclass": dataclass})
    exec(textwrap.dedent(body), module.__dict__)
    return module


def test_builtin_dropout_is_found_through_its_entry_point():
    infos = {i.name: i for i in plugin_infos()}
    assert "dropout" in infos
    info = infos["dropout"]
    assert info.builtin and info.distribution == "regfw" and info.version == regfw.__version__
    assert info.module == "regfw_plugins.dropout"
    assert "regfw_register_regularizers" in info.hooks
    spec = get_registry().get("dropout")
    assert spec.plugin == "dropout" and spec.distribution == "regfw"


THROWAWAY = """
@dataclass
class Cfg:
    strength: float = 1.0

class Throwaway(Regularizer):
    name = "throwaway"
    Config = Cfg

@regfw.hookimpl
def regfw_register_regularizers(register):
    register(Throwaway)
"""


def test_throwaway_plugin_is_found_and_unregistered(monkeypatch):
    module = _plugin_module("throwaway_plugin", THROWAWAY, monkeypatch)
    register_plugin(module, "throwaway")
    try:
        assert "throwaway" in get_registry().names()
        assert "throwaway" in {i.name for i in plugin_infos()}
    finally:
        unregister_plugin("throwaway")
    assert "throwaway" not in get_registry().names()
    assert get_plugin_manager().get_plugin("throwaway") is None


def test_misspelled_hook_is_an_error_naming_it(monkeypatch):
    module = _plugin_module("typo_plugin", """
        @regfw.hookimpl
        def regfw_register_regularizer(register):
            pass
    """, monkeypatch)
    with pytest.raises(PluginError) as err:
        register_plugin(module, "typo")
    assert "regfw_register_regularizer" in str(err.value)
    assert "unknown hook" in str(err.value)
    assert "regfw_register_regularizers" in str(err.value)  # the known hooks are listed
    assert "Did you mean 'regfw_register_regularizers'?" in str(err.value)
    assert get_plugin_manager().get_plugin("typo") is None


def test_a_name_two_plugins_register_keeps_both_and_the_bare_name_is_ambiguous(monkeypatch):
    module = _plugin_module("dup_plugin", """
        class Dup(Regularizer):
            name = "dropout"

        @regfw.hookimpl
        def regfw_register_regularizers(register):
            register(Dup)
    """, monkeypatch)
    register_plugin(module, "dup")
    try:
        registry = get_registry()
        assert registry.get("regfw:dropout").cls.__module__ == "regfw_plugins.dropout"
        assert registry.get("dup:dropout").cls is module.Dup  # a run-time plugin: qualified by its own name
        assert {"regfw:dropout", "dup:dropout"} <= set(registry.names()) and "dropout" not in registry.names()
        with pytest.raises(ConfigError) as err:
            registry.get("dropout")
        text = str(err.value)
        assert text.startswith("regularizers.dropout: the regularizer name 'dropout' is ambiguous: 2 installed "
                               "plugins register it, 'regfw:dropout' (built-in, regfw_plugins.dropout.Dropout) or "
                               "'dup:dropout' (plugin 'dup' registered at run time, dup_plugin.Dup)")
        assert "regularizers: {regfw:dropout: {...}}" in text and "uninstall" not in text.lower()
    finally:
        unregister_plugin("dup")
    assert get_registry().get("dropout").cls.__module__ == "regfw_plugins.dropout"


def test_one_plugin_registering_a_name_twice_names_both_classes(monkeypatch):
    module = _plugin_module("twice_plugin", """
        class One(Regularizer):
            name = "twice"

        class Two(Regularizer):
            name = "twice"

        @regfw.hookimpl
        def regfw_register_regularizers(register):
            register(One)
            register(Two)
    """, monkeypatch)
    register_plugin(module, "twice")
    try:
        with pytest.warns(PluginWarning) as caught:
            registry = get_registry()
        (text,) = [str(w.message) for w in caught if "twice" in str(w.message)]
        assert text.startswith("plugin 'twice' (no entry point) was refused: regularizer 'twice' is registered twice "
                               "by one provider (twice)")
        assert "twice_plugin.One" in text and "twice_plugin.Two" in text
        assert "twice" not in registry.names() and "dropout" in registry.names()  # it adds nothing; the rest works
        with pytest.raises(PluginError, match=r"^regularizers\.twice: regularizer 'twice' is not available: "
                                              r"plugin 'twice' \(no entry point\) was refused"):
            registry.get("twice")
    finally:
        unregister_plugin("twice")


def _broken_distribution(root):
    """A distribution on ``root`` whose regfw entry point raises on import."""
    (root / "broken_regfw_plugin.py").write_text("raise RuntimeError('boom at import')\n")
    info = root / "regfw_broken-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: regfw-broken\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text("[regfw]\nbroken = broken_regfw_plugin\n")


def test_failing_plugin_import_names_distribution_and_entry_point(tmp_path, monkeypatch, fresh_plugins):
    _broken_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("REGFW_LOAD_PLUGINS", raising=False)
    reset_plugin_manager()
    with pytest.warns(PluginWarning) as caught:
        get_plugin_manager()
    (warning,) = [w for w in caught if "broken" in str(w.message)]  # reported once
    text = str(warning.message)
    assert "plugin 'broken'" in text and "broken = broken_regfw_plugin" in text
    assert "regfw-broken 0.3" in text and "RuntimeError: boom at import" in text
    assert "REGFW_LOAD_PLUGINS" in text
    assert "dropout" in get_registry().names()  # every other plugin loaded


def test_load_plugins_variable_selects_third_party_plugins(tmp_path, monkeypatch, fresh_plugins):
    _broken_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("REGFW_LOAD_PLUGINS", "")
    reset_plugin_manager()
    names = {i.name for i in plugin_infos()}
    assert "dropout" in names and "broken" not in names  # built-ins only
    from regfw.registry.discovery import plugin_failures

    assert plugin_failures() == []
    monkeypatch.setenv("REGFW_LOAD_PLUGINS", "broken")
    reset_plugin_manager()
    with pytest.warns(PluginWarning, match="broken"):
        get_plugin_manager()


def test_broken_plugin_does_not_break_help(tmp_path, run_cli):
    _broken_distribution(tmp_path)
    result = run_cli("--help", env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0 and "fit" in result.stdout
    result = run_cli("plugins", "--check", env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 1
    assert "dropout" in result.stdout  # the others are listed
    assert result.stderr.count("plugin 'broken'") == 1
    assert "regfw plugins: error: plugin 'broken'" in result.stderr
    assert "Traceback" not in result.stderr


def test_plugin_discovery_imports_no_lightning():
    """Every built-in loads at discovery (``regfw plugins``, config validation) without Lightning:
    the per-step callbacks (regfw.train.step_hooks, the adaptive and coadaptation callbacks) are imported
    only when a fit asks a regularizer for them."""
    import subprocess

    code = ("import sys; from regfw.registry.regularizers import get_registry; names = get_registry().names(); "
            "print(sorted(names)); print('pytorch_lightning' in sys.modules, 'lightning' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    names, lightning = out.stdout.strip().splitlines()
    assert "'adaptive_dropout'" in names and "'coadaptation'" in names and "'max_norm'" in names
    assert lightning == "False False"


DROPOUT_FAMILY = {"dropout", "gaussian_dropout", "alpha_dropout", "spatial_dropout", "dropblock", "drop_path",
                  "locked_dropout", "dropconnect", "attention_dropout"}


def test_every_dropout_variant_is_a_plugin_selectable_by_name():
    registry = get_registry()
    assert DROPOUT_FAMILY <= set(registry.names())
    builtin_plugins = {i.name for i in plugin_infos() if i.builtin}
    assert {"dropout", "conv_dropout", "drop_path", "recurrent_dropout", "attention_dropout"} <= builtin_plugins
    for name in DROPOUT_FAMILY:
        spec = registry.get(name)
        assert spec.cls.family in ("dropout", "dropconnect") and spec.cls.description
