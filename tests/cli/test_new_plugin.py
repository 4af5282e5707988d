"""``regfw new-plugin``: the generated files, the name checks and the all-or-nothing write."""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

import regfw
import regfw.cli.main as cli
from regfw.cli.new_plugin import (
    SUFFIX,
    check_name,
    class_name,
    distribution_name,
    new_plugin,
    render,
    render_template,
    template_files,
)
from regfw.config.schema import validate
from regfw.errors import RegfwError
from regfw.registry.discovery import register_plugin, unregister_plugin

ROOT = Path(__file__).resolve().parents[2]
EXPECTED_FILES = {
    ".gitignore",
    "README.md",
    "example.yaml",
    "pyproject.toml",
    "regfw_my_noise/__init__.py",
    "tests/test_my_noise.py",
    "tests/test_typing.py",
}


def test_names_of_the_generated_package():
    assert distribution_name("my_noise") == "regfw-my-noise"
    assert class_name("my_noise") == "MyNoise"
    assert class_name("jitter2") == "Jitter2"


def test_rendered_template_is_complete_valid_and_wired_to_the_entry_point():
    files = render_template("my_noise")
    assert set(files) == EXPECTED_FILES
    for path, text in files.items():
        assert not re.search(r"\{\{\s*\w+\s*\}\}", text), path  # no placeholder left
    for path in ("regfw_my_noise/__init__.py", "tests/test_my_noise.py"):
        ast.parse(files[path], filename=path)
    project = tomllib.loads(files["pyproject.toml"])
    assert project["project"]["name"] == "regfw-my-noise"
    assert project["project"]["dependencies"] == [f"regfw>={regfw.__version__}"]
    assert project["project"]["entry-points"]["regfw"] == {"my_noise": "regfw_my_noise"}
    assert project["tool"]["setuptools"]["packages"] == ["regfw_my_noise"]
    module = ast.parse(files["regfw_my_noise/__init__.py"])
    classes = {node.name for node in module.body if isinstance(node, ast.ClassDef)}
    assert {"MyNoise", "MyNoiseConfig", "MyNoiseLayer"} <= classes
    assert 'name = "my_noise"' in files["regfw_my_noise/__init__.py"]
    # the example config is a valid regfw config apart from the plugin it selects
    raw = yaml.safe_load(files["example.yaml"])
    assert raw["regularizers"] == {"my_noise": {"hidden": 0.2}}
    validate(raw, check_plugins=False)
    readme = files["README.md"]
    for needle in ("pip install -e .", "regfw plugins", "regularizers:", "my_noise:", "twine upload"):
        assert needle in readme


def test_every_template_file_is_used():
    paths = [str(rel) for rel, _ in template_files()]
    assert all(p.endswith(SUFFIX) for p in paths)
    assert len(paths) == len(EXPECTED_FILES)


def test_an_unknown_template_key_is_an_error_not_output():
    with pytest.raises(ValueError, match=r"x\.tmpl: unknown template key \{\{nmae\}\}; known keys: name"):
        render("a {{ nmae }} b", {"name": "n"}, "x.tmpl")
    assert render("{{name}}-{{ name }}", {"name": "n"}) == "n-n"


def test_cli_writes_the_package_and_says_what_to_do_next(tmp_path, capsys):
    assert cli.main(["new-plugin", "my_noise", "--dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    target = tmp_path / "out" / "regfw-my-noise"
    written = {str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()}
    assert written == EXPECTED_FILES
    assert (target / "pyproject.toml").read_text() == render_template("my_noise")["pyproject.toml"]
    assert f"wrote {target}/" in out and "tests/test_my_noise.py" in out and "pip install -e ." in out
    assert sorted(os.listdir(tmp_path / "out")) == ["regfw-my-noise"]  # no temporary folder left
    assert oct(target.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("name, hint", [
    ("My-Noise", "such as 'my_noise'"),
    ("3d", "such as 'my_3d'"),
    ("class", "not a Python keyword"),
    ("", "choose another name"),
])
def test_a_name_that_is_not_a_lowercase_identifier_is_refused(tmp_path, capsys, name, hint):
    assert cli.main(["new-plugin", name, "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"regfw new-plugin: error: plugin name {name!r} is not a lowercase Python identifier" in err
    assert hint in err
    assert os.listdir(tmp_path) == []


def test_names_of_builtin_plugins_and_existing_modules_are_refused(tmp_path):
    with pytest.raises(RegfwError, match=r"plugin name 'dropout' is already taken by the regfw plugin 'dropout' "
                                         r"of distribution regfw; .* choose another name"):
        check_name("dropout", tmp_path)
    with pytest.raises(RegfwError, match=r"plugin name 'templates': a module named 'regfw_templates' is already "
                                         r"importable"):
        check_name("templates", tmp_path)
    assert os.listdir(tmp_path) == []


def test_a_regularizer_name_registered_by_any_plugin_is_refused(tmp_path, monkeypatch):
    import types
    from dataclasses import dataclass

    @dataclass
    class Cfg:
        x: float = 0.0

    class Taken(regfw.Regularizer):
        name = "taken_here"
        Config = Cfg

    plugin = types.ModuleType("scaffold_clash_plugin")
    plugin.regfw_register_regularizers = regfw.hookimpl(lambda register: register(Taken))
    Taken.__module__ = plugin.__name__
    monkeypatch.setitem(sys.modules, plugin.__name__, plugin)
    register_plugin(plugin, "scaffold_clash")
    try:
        with pytest.raises(RegfwError, match=r"plugin name 'taken_here' is already taken by the regularizer "
                                             r"'taken_here' of plugin 'scaffold_clash'"):
            check_name("taken_here", tmp_path)
    finally:
        unregister_plugin("scaffold_clash")
    assert check_name("taken_here", tmp_path) == tmp_path / "regfw-taken-here"


def test_an_existing_target_is_left_untouched(tmp_path):
    target = tmp_path / "regfw-my-noise"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(RegfwError, match=r"regfw-my-noise' already exists; choose another name or --dir"):
        new_plugin("my_noise", tmp_path)
    assert [p.name for p in target.iterdir()] == ["keep.txt"] and (target / "keep.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["regfw-my-noise"]


def test_a_failure_while_writing_leaves_nothing_behind(tmp_path):
    files = {"a.txt": "written first", "sub/b.txt": None}  # the second write raises TypeError
    with pytest.raises(TypeError):
        new_plugin("my_noise", tmp_path, files=files)
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_a_non_editable_wheel_ships_the_plugin_template(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    if not (src / "README.md").exists():
        (src / "README.md").write_text("regfw\n")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("regfw", "plugins", "templates"):
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "w"),
         str(src)], capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "w").glob("regfw-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"regfw_templates/plugin/{rel}" for rel, _ in template_files()}
    assert expected <= names, sorted(expected - names)
    assert "regfw/cli/new_plugin.py" in names
