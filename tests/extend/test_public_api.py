"""The public API a plugin may use: listed in docs/plugins.md, importable, and all the template uses."""
from __future__ import annotations

import ast
import re
from importlib import import_module
from pathlib import Path

import pytest

from regfw.cli.new_plugin import render_template

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "plugins.md"
#: The built-in plugins (import package ``regfw_plugins``): written exactly as a third party would.
BUILTIN_PLUGINS = sorted((ROOT / "plugins").rglob("*.py"))


def public_api() -> dict[str, set[str]]:
    """``{module: names}`` from the table under "## Public API" in docs/plugins.md."""
    text = DOC.read_text()
    section = text.split("## Public API", 1)[1].split("\n## ", 1)[0]
    table: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or not cells[0].startswith("`regfw"):
            continue
        module = cells[0].strip("`")
        names = set(re.findall(r"`([^`]+)`", cells[1]))
        if names == {"__all__"}:
            names = set(import_module(module).__all__)
        table[module] = names
    return table


def violations(source: str, own_package: str, api: dict[str, set[str]], own_levels: int = 0) -> list[str]:
    """Every use of regfw in ``source`` outside ``api``, and every import of another ``regfw_*`` package.

    ``own_levels``: how many levels of relative import stay inside the plugin's own package (1 for a
    module of a plugin package such as ``plugins/adaptive/``; 0 for a one-module plugin).
    """
    found: list[str] = []
    aliases: dict[str, str] = {}  # local name -> public module it is bound to
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top == "regfw":
                    if alias.name not in api:
                        found.append(f"import {alias.name}: not a public module")
                    aliases[alias.asname or top] = alias.name if alias.asname else "regfw"
                elif top.startswith("regfw_") and top != own_package:
                    found.append(f"import {alias.name}: another regfw package")
        elif isinstance(node, ast.ImportFrom) and node.level > own_levels:
            found.append(f"from {'.' * node.level}{node.module or ''} import ...: a relative import of another "
                         f"module of the plugin package")
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            top = node.module.split(".")[0]
            if top == "regfw":
                if node.module not in api:
                    found.append(f"from {node.module} import ...: not a public module")
                    continue
                for alias in node.names:
                    if alias.name.startswith("_") and alias.name != "__version__" or alias.name not in api[node.module]:
                        found.append(f"from {node.module} import {alias.name}: not public")
            elif top.startswith("regfw_") and top != own_package:
                found.append(f"from {node.module} import ...: another regfw package")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            module = aliases[node.value.id]
            if node.attr not in api.get(module, set()):
                found.append(f"{node.value.id}.{node.attr}: not public in {module}")
    return found


def test_every_name_listed_as_public_exists():
    api = public_api()
    assert {"regfw", "regfw.extend", "regfw.layers"} <= set(api)
    missing = [f"{m}.{n}" for m, names in api.items() for n in sorted(names) if not hasattr(import_module(m), n)]
    assert not missing, f"docs/plugins.md lists names that do not exist: {missing}"


def test_the_public_names_a_plugin_needs_are_listed():
    api = public_api()
    assert {"hookimpl", "Regularizer", "InjectingRegularizer", "PlanItem", "PlanContext", "StochasticModule",
            "kinds"} <= api["regfw"]
    assert {"rate", "nonneg", "positive", "InjectingRegularizer", "model_map", "Step", "hookimpl",
            "kinds", "HIDDEN", "RateRange"} <= api["regfw.extend"]
    assert 40 <= len(api["regfw.extend"]) <= 65  # one door, not the internals published
    assert "StochasticModule" in api["regfw.layers"]
    import regfw
    from regfw.layers import StochasticModule

    assert regfw.StochasticModule is StochasticModule


def test_the_plugin_template_uses_only_the_public_api():
    api = public_api()
    files = render_template("api_check")
    sources = {path: text for path, text in files.items() if path.endswith(".py")}
    assert set(sources) == {"regfw_api_check/__init__.py", "tests/test_api_check.py", "tests/test_typing.py"}
    for path, text in sources.items():
        assert "regfw" in text
        assert violations(text, "regfw_api_check", api) == [], path


@pytest.mark.parametrize("path", BUILTIN_PLUGINS, ids=lambda p: str(p.relative_to(ROOT / "plugins")))
def test_every_builtin_plugin_uses_only_the_public_api(path):
    """A built-in imports only the public names, and no other plugin: a module of a plugin package
    (``plugins/adaptive/``) may import its own package, nothing else of ``regfw_plugins``."""
    nested = path.parent != ROOT / "plugins"
    own = f"regfw_plugins.{path.parent.name}" if nested else ""
    found = violations(path.read_text(), "", public_api(), own_levels=1 if nested else 0)
    # An absolute import of the plugin's own package is fine too.
    assert [v for v in found if not (own and v.startswith(f"from {own}"))] == []


def test_the_builtin_plugins_are_all_checked():
    names = {str(p.relative_to(ROOT / "plugins").with_suffix("")) for p in BUILTIN_PLUGINS}
    assert {"dropout", "noise", "weight_decay", "l1", "max_norm", "drop_path", "adaptive/__init__",
            "adaptive/callback", "coadaptation/__init__", "coadaptation/monitor"} <= names
    assert "_callbacks" not in names  # shared helpers live in the public API (regfw.extend)


@pytest.mark.parametrize("source, expected", [
    ("from regfw.placement.surgery import attach", "from regfw.placement.surgery import ...: not a public module"),
    ("from regfw.layers.base import StochasticModule", "from regfw.layers.base import ...: not a public module"),
    ("from regfw.placement.kinds import HIDDEN", "from regfw.placement.kinds import ...: not a public module"),
    ("from regfw.extend import _LAZY", "from regfw.extend import _LAZY: not public"),
    ("from regfw.extend import split_parameters", "from regfw.extend import split_parameters: not public"),
    ("import regfw\nregfw._LAZY", "regfw._LAZY: not public in regfw"),
    ("import regfw.placement.plan", "import regfw.placement.plan: not a public module"),
    ("import regfw.extend as E\nE.builtin_kind", "E.builtin_kind: not public in regfw.extend"),
    ("from regfw_plugins.dropout import Dropout", "from regfw_plugins.dropout import ...: another regfw package"),
    ("from .weight_decay import check_finite",
     "from .weight_decay import ...: a relative import of another module of the plugin package"),
    ("def f():\n    from regfw.placement.surgery import analyse",
     "from regfw.placement.surgery import ...: not a public module"),
])
def test_the_checker_reports_private_uses(source, expected):
    assert violations(source, "regfw_mine", public_api()) == [expected]
