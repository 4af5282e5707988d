"""tests/ mirrors the package: one test file per built-in plugin, and every test the docs cite exists.

The built-in plugins are the ``regfw`` entry points of pyproject.toml (the names ``regfw plugins``
lists); each has ``tests/builtin_plugins/test_<entry point>.py`` of its own and that folder holds
nothing else, so a newcomer finds a plugin's tests by its name. A page that cites a test as
evidence (``tests/x/test_y.py::test_z``) names a test file that exists and a test it defines (or a
file that ``regfw new-plugin`` writes), so moving a test without updating the page fails here.
"""
from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_TESTS = ROOT / "tests" / "builtin_plugins"
PACKAGE = "regfw_plugins"  # plugins/ installs as this import package


def builtin_plugins() -> dict[str, str]:
    """Entry-point name -> module, for every built-in plugin declared in pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return dict(project["entry-points"]["regfw"])


def test_every_module_in_plugins_is_a_declared_entry_point():
    declared = {module.removeprefix(f"{PACKAGE}.") for module in builtin_plugins().values()}
    on_disk = {p.stem for p in (ROOT / "plugins").glob("*.py") if p.stem != "__init__"}
    on_disk |= {p.parent.name for p in (ROOT / "plugins").glob("*/__init__.py")}
    assert on_disk == declared, (
        f"plugins/ holds {sorted(on_disk - declared)} without an entry point in pyproject.toml "
        f"[project.entry-points.regfw], and the entry points name {sorted(declared - on_disk)} missing from plugins/")


def plugin_test_problems(plugins: dict[str, str], present: set[str]) -> list[str]:
    """What is wrong with the test files ``present`` in tests/builtin_plugins/ for ``plugins``
    (entry-point name -> module): a plugin without ``test_<entry point>.py``, or a file named for none."""
    expected = {f"test_{name}.py": name for name in plugins}
    problems = [f"built-in plugin {plugins[expected[f]]} (entry point {expected[f]!r}) has no test file of its own: "
                f"add tests/builtin_plugins/{f}" for f in sorted(expected.keys() - present)]
    problems += [f"tests/builtin_plugins/{f} is named for no built-in plugin: move each of its tests into the "
                 f"test_<entry point>.py of the plugin it tests (shared helpers go in a module without the test_ "
                 f"prefix)" for f in sorted(present - expected.keys())]
    return problems


def test_every_builtin_plugin_has_one_test_file_named_for_it():
    present = {p.name for p in PLUGIN_TESTS.glob("test_*.py")}
    assert not plugin_test_problems(builtin_plugins(), present)


def test_a_plugin_without_its_own_file_and_a_shared_file_are_each_named_with_the_fix():
    plugins = {"rdrop": "regfw_plugins.rdrop", "mixup": "regfw_plugins.mixup"}
    assert plugin_test_problems(plugins, {"test_rdrop.py", "test_step_regularizers.py"}) == [
        "built-in plugin regfw_plugins.mixup (entry point 'mixup') has no test file of its own: "
        "add tests/builtin_plugins/test_mixup.py",
        "tests/builtin_plugins/test_step_regularizers.py is named for no built-in plugin: move each of its tests "
        "into the test_<entry point>.py of the plugin it tests (shared helpers go in a module without the test_ "
        "prefix)",
    ]
    assert {"dropout", "mixup", "rdrop", "label_smoothing", "confidence_penalty"} <= builtin_plugins().keys()


CITED = re.compile(r"(tests/[\w/]+\.py)(?:::(\w+))?|`::(\w+)")


def citations(text: str) -> list[tuple[str, str | None]]:
    """(test file, test name or None) for every test a page cites; a bare ``::name`` after a full
    citation on the same line names a test of that file."""
    found = []
    for line in text.splitlines():
        last = None
        for m in CITED.finditer(line):
            if m.group(1):
                last = m.group(1)
                found.append((last, m.group(2)))
            elif last is not None:
                found.append((last, m.group(3)))
    return found


def defined_names(path: Path) -> set[str]:
    """Top-level functions and classes of a test file, and the methods of its classes."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {n.name for n in node.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    return names


def template_files() -> list[re.Pattern[str]]:
    """The files ``regfw new-plugin NAME`` writes, as patterns (the pages cite them for an example NAME)."""
    template = ROOT / "templates" / "plugin"
    paths = [p.relative_to(template).as_posix().removesuffix(".tmpl") for p in template.rglob("*.tmpl")]
    return [re.compile(re.escape(p).replace(re.escape("{{name}}"), r"\w+")) for p in paths]


def broken_citations(text: str) -> tuple[int, list[str]]:
    """How many tests ``text`` cites, and each citation that names no existing file or test."""
    generated = template_files()
    found = citations(text)
    broken = []
    for file, name in found:
        exists = (ROOT / file).is_file()
        if not exists and not any(g.fullmatch(file) for g in generated):
            broken.append(f"{file} does not exist")
        elif name is not None and (not exists or name not in defined_names(ROOT / file)):
            broken.append(f"{file} has no test {name}")
    return len(found), broken


def test_every_test_the_docs_and_benchmarks_cite_exists():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "bench").rglob("*.py"))]
    cited, broken = 0, []
    for page in pages:
        count, problems = broken_citations(page.read_text())
        cited += count
        broken += [f"{page.relative_to(ROOT)}: {problem}" for problem in problems]
    assert cited > 50  # the pages do cite tests: the pattern finds them
    assert not broken, "cited tests that moved or were renamed (update the page): " + "; ".join(broken)


def test_a_moved_file_a_renamed_test_and_a_template_file_are_told_apart():
    text = ("| `tests/builtin_plugins/test_step_regularizers.py::test_mixup_trains_and_softens_predictions` |\n"
            "`tests/builtin_plugins/test_mixup.py::test_mixup_trains`, `::test_mixup_trains_and_softens_predictions`\n"
            "| `tests/test_my_noise.py` | behaviour tests |\n")
    assert broken_citations(text) == (4, [
        "tests/builtin_plugins/test_step_regularizers.py does not exist",
        "tests/builtin_plugins/test_mixup.py has no test test_mixup_trains",
    ])
