"""Failure isolation: one broken plugin is reported once and breaks only the configs that select it.

The plugins here are real distributions (a ``*.dist-info`` with an ``entry_points.txt`` and a
module on a temporary ``sys.path`` entry), found by ``importlib.metadata`` and loaded by pluggy.
"""
from __future__ import annotations

import pytest
from plugin_dists import distribution

from regfw.config.schema import load_config
from regfw.errors import ConfigError, PluginError
from regfw.registry.discovery import PluginWarning, get_plugin_manager, plugin_failures, reset_plugin_manager
from regfw.registry.regularizers import get_registry

PLAIN = """
import regfw
from regfw import Regularizer

class {cls}(Regularizer):
    name = "{reg}"

{marker}
def {hook}(register):
    register({cls})
"""



@pytest.fixture
def plugin_path(tmp_path, monkeypatch, fresh_plugins):
    """A folder on sys.path holding: a plugin that fails to import, one without the hook marker, one
    with a misspelled hook, and one that works."""
    distribution(tmp_path, "regfw-broken", "broken", "regfw_broken", "raise ImportError('needs libfoo')\n")
    distribution(tmp_path, "regfw-gumbel", "gumbel", "regfw_gumbel",
                 PLAIN.format(cls="Gumbel", reg="gumbel_dropout", marker="", hook="regfw_register_regularizers"))
    marked = "@regfw.hookimpl"
    distribution(tmp_path, "regfw-typo", "typo", "regfw_typo",
                 PLAIN.format(cls="Typo", reg="typo_noise", marker=marked, hook="regfw_register_regularizer"))
    distribution(tmp_path, "regfw-good", "good", "regfw_good",
                 PLAIN.format(cls="Good", reg="good_noise", marker=marked, hook="regfw_register_regularizers"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("REGFW_LOAD_PLUGINS", raising=False)
    reset_plugin_manager()
    return tmp_path


def test_each_failure_is_reported_once_and_every_other_plugin_loads(plugin_path):
    with pytest.warns(PluginWarning) as caught:
        get_plugin_manager()
    messages = [str(w.message) for w in caught if issubclass(w.category, PluginWarning)]
    assert len(messages) == 3, messages
    broken, gumbel, typo = sorted(messages)
    assert broken.startswith("plugin 'broken' (entry point 'broken = regfw_broken' of distribution regfw-broken 1.0) "
                             "failed to import: ImportError: needs libfoo")
    assert ("plugin 'gumbel' (entry point 'gumbel = regfw_gumbel' of distribution regfw-gumbel 1.0) "
            "implements no regfw hook: regfw_register_regularizers lacks the @regfw.hookimpl marker") in gumbel
    assert "unknown hook 'regfw_register_regularizer'" in typo and "Did you mean 'regfw_register_regularizers'?" in typo
    assert {"good_noise", "dropout", "rdrop"} <= set(get_registry().names())
    assert [f.problem for f in plugin_failures()] == ["import", "no hooks", "invalid"]


def test_a_config_that_does_not_select_a_failed_plugin_runs(plugin_path):
    with pytest.warns(PluginWarning):
        cfg = load_config(None, ["data.name=digits", "model.name=mlp", "regularizers.good_noise={}"])
    assert list(cfg.regularizers) == ["good_noise"]


def test_selecting_a_regularizer_of_a_failed_plugin_names_the_plugin_not_an_unrelated_name(plugin_path):
    with pytest.warns(PluginWarning):
        get_plugin_manager()
    with pytest.raises(PluginError) as err:
        load_config(None, ["data.name=digits", "model.name=mlp", "regularizers.gumbel_dropout={}"])
    text = str(err.value)
    assert text.startswith("regularizers.gumbel_dropout: regularizer 'gumbel_dropout' is not available: "
                           "plugin 'gumbel' (entry point 'gumbel = regfw_gumbel'")
    assert "lacks the @regfw.hookimpl marker" in text and "Did you mean" not in text
    with pytest.raises(PluginError, match=r"regularizers\.broken: .*failed to import: ImportError: needs libfoo"):
        get_registry().get("broken")


def test_an_unknown_name_lists_the_failed_plugins_that_may_provide_it(plugin_path):
    with pytest.warns(PluginWarning):
        get_plugin_manager()
    with pytest.raises(ConfigError) as err:
        get_registry().get("zzz_unheard_of")
    text = str(err.value)
    assert "unknown regularizer 'zzz_unheard_of'" in text
    assert "These plugins did not load and may provide it: plugin 'broken'" in text


def test_unknown_load_plugins_name_gets_did_you_mean(plugin_path, monkeypatch):
    monkeypatch.setenv("REGFW_LOAD_PLUGINS", "good,goood")
    reset_plugin_manager()
    with pytest.warns(PluginWarning) as caught:
        get_plugin_manager()
    (message,) = [str(w.message) for w in caught]
    assert message == ("REGFW_LOAD_PLUGINS names 'goood', which no installed plugin declares. Installed "
                       "third-party plugins: broken, good, gumbel, typo. Did you mean 'good'?")
    assert "good_noise" in get_registry().names()


@pytest.mark.slow
def test_cli_lists_the_others_warns_for_unrelated_configs_and_fails_for_selecting_ones(plugin_path, run_cli):
    env = {"PYTHONPATH": str(plugin_path)}
    listed = run_cli("plugins", "--check", env=env)
    assert listed.returncode == 1
    assert "good 1.0 (regfw-good; module regfw_good)" in listed.stdout and "dropout" in listed.stdout
    errors = [line for line in listed.stderr.splitlines() if line.startswith("regfw plugins: error:")]
    assert len(errors) == 3 and listed.stderr.count("needs libfoo") == 1
    cfg = plugin_path / "cfg.yaml"
    cfg.write_text("data: {name: digits}\nmodel: {name: mlp}\nregularizers:\n  good_noise: {}\n")
    planned = run_cli("plan", str(cfg), env=env)
    assert planned.returncode == 0, planned.stderr
    assert "needs libfoo" in planned.stderr and "plan:" in planned.stdout
    cfg.write_text("data: {name: digits}\nmodel: {name: mlp}\nregularizers:\n  broken: {}\n")
    failed = run_cli("plan", str(cfg), env=env)
    assert failed.returncode == 2
    assert ("regfw plan: error: regularizers.broken: regularizer 'broken' is not available: plugin 'broken'"
            in failed.stderr)
