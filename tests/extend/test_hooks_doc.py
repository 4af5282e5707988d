"""docs/hooks.md documents every hook exactly; REGFW_TRACE_PLUGINS shows hook calls to plugin authors."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pluggy
import pytest

import regfw
from regfw.extend import hookspecs
from regfw.registry.discovery import _trace, get_plugin_manager

DOC = Path(__file__).resolve().parents[2] / "docs" / "hooks.md"


def documented() -> dict[str, str]:
    """``{hook name: its section}`` for every ``## regfw_*`` section of docs/hooks.md."""
    parts = re.split(r"^## ", DOC.read_text(), flags=re.M)[1:]
    return {part.split("\n", 1)[0].strip(): part for part in parts}


def hook_specs() -> dict[str, pluggy.HookCaller]:
    pm = get_plugin_manager()
    return {name: caller for name, caller in vars(pm.hook).items()
            if isinstance(caller, pluggy.HookCaller) and caller.spec is not None}


def test_every_hook_is_documented_and_every_documented_hook_exists():
    specs, docs = set(hook_specs()), set(documented())
    assert specs >= {"regfw_register_regularizers", "regfw_classify_module", "regfw_stochastic_types"}
    assert not specs - docs, f"hooks missing from docs/hooks.md: {sorted(specs - docs)}"
    assert not docs - specs, f"docs/hooks.md documents hooks that do not exist: {sorted(docs - specs)}"


@pytest.mark.parametrize("name", sorted(n for n in dir(hookspecs) if n.startswith("regfw_")))
def test_documented_signature_first_result_and_example_match_the_spec(name):
    caller = hook_specs()[name]
    section = documented()[name]
    signature = re.search(r"```python\n(.*?)\n", section).group(1)
    assert signature.startswith(f"{name}(")
    func = ast.parse(f"def {signature}: pass").body[0]
    documented_args = tuple(a.arg for a in func.args.args)
    assert documented_args == tuple(caller.spec.argnames), signature
    first = re.search(r"\*\*First-result:\*\* (yes|no)", section).group(1)
    assert (first == "yes") == bool(caller.spec.opts.get("firstresult")), (
        f"{name}: first-result is {first!r} in the doc")
    for arg in caller.spec.argnames:
        assert f"`{arg}`" in section.split("**Arguments:**", 1)[1].split("**Called:**", 1)[0], arg
    assert "**Called:**" in section
    assert f"@regfw.hookimpl\ndef {name}(" in section, "an example implementation"


class _Kinds:
    @regfw.hookimpl
    def regfw_classify_module(self, module, path):
        return "hidden" if path == "a" else None


class _NoOpinion:
    @regfw.hookimpl
    def regfw_classify_module(self, module, path):
        return None


class _Broken:
    @regfw.hookimpl
    def regfw_stochastic_types(self):
        raise RuntimeError("no types today")


def test_trace_prints_arguments_implementations_in_call_order_and_results(capsys):
    pm = pluggy.PluginManager("regfw")
    pm.add_hookspecs(hookspecs)
    _trace(pm)
    pm.register(_Kinds(), name="kinds_plugin")
    pm.register(_NoOpinion(), name="late_plugin")  # registered last, so called first
    pm.register(_Broken(), name="broken_plugin")
    assert pm.hook.regfw_classify_module(module="M", path="a") == "hidden"
    with pytest.raises(RuntimeError):
        pm.hook.regfw_stochastic_types()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[regfw trace]")]
    assert lines[0] == "[regfw trace] call regfw_classify_module(module='M', path='a') [firstresult]"
    assert lines[1] == ("[regfw trace]   implementations, in call order: "
                        f"late_plugin ({__name__}._NoOpinion.regfw_classify_module), "
                        f"kinds_plugin ({__name__}._Kinds.regfw_classify_module)")
    assert re.fullmatch(r"\[regfw trace\]   regfw_classify_module -> 'hidden' \(\d+\.\d ms\)", lines[2])
    assert lines[3] == "[regfw trace] call regfw_stochastic_types()"
    assert re.fullmatch(r"\[regfw trace\]   regfw_stochastic_types -> raised RuntimeError: no types today "
                        r"\(\d+\.\d ms\)", lines[5])


def test_trace_env_var_prints_registrations_and_hook_calls_of_the_cli(run_cli):
    proc = run_cli("plugins", "--check", env={"REGFW_TRACE_PLUGINS": "1", "REGFW_LOAD_PLUGINS": ""})
    assert proc.returncode == 0, proc.stderr
    assert "dropout" in proc.stdout and "[regfw trace]" not in proc.stdout
    err = proc.stderr
    assert "[regfw trace] register plugin 'dropout' (regfw " in err
    assert "; module regfw_plugins.dropout): hooks regfw_register_regularizers" in err
    assert "[regfw trace] call regfw_register_regularizers(register=<register for plugin 'dropout'>)" in err
    assert "dropout (regfw_plugins.dropout.regfw_register_regularizers)" in err
    assert re.search(r"regfw_register_regularizers -> \[\] \(\d+\.\d ms\)", err)
