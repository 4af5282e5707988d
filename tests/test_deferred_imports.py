"""Imports of regfw's own modules inside functions only at the command-line boundary (``regfw/cli/``).

Everywhere else (``regfw/`` and the built-in plugins, ``plugins/``) a module imports what it uses at
its top, so its dependencies are read in one place and an import cycle cannot hide in a function
(tests/test_import_cycles.py counts those too). An import that must stay inside a function is listed
in :data:`ALLOWED` with its reason: Lightning or torch kept out of a start-up path that does not
use them (plugin discovery, config validation, ``regfw plan``, ``regfw plugins``).
The imports are read with ``ast``, by the function that holds them.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: source folder -> the import package it installs as
PACKAGES = {"regfw": "regfw", "plugins": "regfw_plugins"}
#: the command-line boundary: its commands import what they run when they run it
BOUNDARY = "regfw/cli/"

TORCH_FREE = ("torch: config validation imports this module before torch is imported (a config error answers "
              "at once); these functions run on built objects")
PLAIN_DATA = "Lightning only when a Lightning data module is asked for (regfw plan builds the plain data)"
BEFORE_TORCH = "config validation runs before torch and Lightning are imported (a config error answers at once)"
LIGHTNING = ("Lightning: a callback, imported when a fit asks the regularizer for its callbacks; plugin "
             "discovery and `regfw plan` import no Lightning")

#: (file, function, module) -> why the import stays inside the function.
ALLOWED: dict[tuple[str, str, str], str] = {
    ("regfw/extend/regularizer.py", "InjectingRegularizer.callbacks", "regfw.train.schedule_callback"): LIGHTNING,
    ("regfw/registry/blame.py", "_deselect", "regfw.registry.regularizers"):
        "blame names the plugin behind any command's error, the torch-free `regfw plugins` included: the "
        "registry imports torch, and may be what failed (the import sits in the try that catches that)",
    ("regfw/train/losses.py", "check_model_loss", "regfw.placement.structure"): TORCH_FREE,
    ("regfw/train/losses.py", "gaussian_nll", "regfw.tensors"): TORCH_FREE,
    ("regfw/train/losses.py", "mc_output_transform", "regfw.tensors"): TORCH_FREE,
    ("plugins/adaptive/__init__.py", "AdaptiveDropout.callbacks", "regfw_plugins.adaptive.callback"): LIGHTNING,
    ("plugins/coadaptation/__init__.py", "Coadaptation.callbacks", "regfw_plugins.coadaptation.monitor"): LIGHTNING,
    ("plugins/concrete_dropout.py", "ConcreteDropoutRegularizer.callbacks", "regfw.extend"): LIGHTNING,
    ("plugins/max_norm.py", "MaxNorm.callbacks", "regfw.extend"): LIGHTNING,
    ("plugins/weight_decay.py", "WeightDecay.callbacks", "regfw.extend"): LIGHTNING,
    ("regfw/build/factory.py", "build_datamodule", "regfw.build.lightning_data"): PLAIN_DATA,
    ("regfw/config/schema.py", "DataConfig.__post_init__", "regfw.train.batch"): BEFORE_TORCH,
    ("regfw/config/schema.py", "validate", "regfw.registry.regularizers"): BEFORE_TORCH,
}


def module_name(path: Path) -> str:
    """The import name of the source file ``path`` (``plugins/adaptive/__init__.py`` -> ``regfw_plugins.adaptive``)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    parts[0] = PACKAGES[parts[0]]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def function_imports(path: Path, module: str | None = None) -> list[tuple[str, int, str]]:
    """``(function, line, module)`` for every import of a regfw module inside a function of ``path``
    (whose import name is ``module``; by default read off its place in the repository); ``function``
    is the qualified name of the innermost function (``Class.method``), ``module`` the module
    imported, or imported from, made absolute."""
    tree = ast.parse(path.read_text(), filename=str(path))
    module = module or module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, int, str]] = []

    def absolute(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        return ".".join([*base, *([node.module] if node.module else [])])

    def visit(node: ast.AST, names: list[str], in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                visit(child, [*names, child.name], True)
            elif isinstance(child, ast.ClassDef):
                visit(child, [*names, child.name], in_function)
            else:
                if in_function and isinstance(child, ast.Import):
                    found.extend((".".join(names), child.lineno, a.name) for a in child.names
                                 if a.name.split(".")[0] in PACKAGES.values())
                elif in_function and isinstance(child, ast.ImportFrom):
                    source = absolute(child)
                    if source.split(".")[0] in PACKAGES.values():
                        found.append((".".join(names), child.lineno, source))
                visit(child, names, in_function)

    visit(tree, [], False)
    return found


def deferred_imports() -> dict[tuple[str, str, str], int]:
    """``{(file, function, module): line}`` for regfw/ outside the command line, and plugins/."""
    out: dict[tuple[str, str, str], int] = {}
    for folder in PACKAGES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith(BOUNDARY):
                continue
            for function, line, module in function_imports(path):
                out.setdefault((rel, function, module), line)
    return out


def test_regfw_modules_are_imported_at_the_top_outside_the_command_line():
    found = deferred_imports()
    new = [f"{file}:{line} {function}() imports {module}" for (file, function, module), line in sorted(found.items())
           if (file, function, module) not in ALLOWED]
    assert not new, ("imports of regfw modules inside functions: " + "; ".join(new) + ". Import at the top of the "
                     "module; if it must stay in the function (an import cycle, Lightning or torch on a start-up "
                     "path that does not use them), add (file, function, module) to ALLOWED in "
                     "tests/test_deferred_imports.py with the reason")
    gone = sorted(set(ALLOWED) - set(found))
    assert not gone, f"listed in ALLOWED but no longer imported inside the function, remove: {gone}"


def test_every_allowed_import_says_why():
    assert all(reason.strip() for reason in ALLOWED.values())


@pytest.mark.parametrize("source, expected", [
    ("import os\nfrom regfw.errors import ConfigError\n", []),
    ("def f():\n    from regfw.errors import ConfigError\n", [("f", 2, "regfw.errors")]),
    ("class C:\n    def m(self):\n        import regfw.placement.surgery\n",
     [("C.m", 3, "regfw.placement.surgery")]),
    ("def f():\n    def g():\n        from . import monitor\n", [("f.g", 3, "regfw_plugins.pkg")]),
    ("def f():\n    if True:\n        from .callback import X\n    import json\n",
     [("f", 3, "regfw_plugins.pkg.callback")]),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from regfw.train.steps import Step\n", []),
], ids=["top-level", "function", "method", "nested-function", "nested-block", "type-checking"])
def test_the_scan_finds_imports_in_functions_methods_and_nested_blocks(tmp_path, source, expected):
    path = tmp_path / "__init__.py"  # stands for plugins/pkg/__init__.py: relative imports resolve against it
    path.write_text(source)
    assert function_imports(path, "regfw_plugins.pkg") == expected
