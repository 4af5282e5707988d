"""The README and the docs stay true: what they cite exists, and the README stays a short door.

Each claim of the README and the docs pages is backed by a test or a bench command it names; these
tests check that every test, file and bench script named in them exists, that the reliability
table names its tests, and that the README lists exactly the built-in regularizers, each linked to
its section of the docs. (Links and anchors between docs pages are checked by the strict build,
`make docs`; the code examples run in tests/docs/test_examples.py.)
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
#: "about 150 lines": the README is the door, the site holds the rest.
README_MAX_LINES = 150


def _defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def _reference():
    """docs/_hooks/reference.py, the generator of the docs' reference parts."""
    sys.path.insert(0, str(DOCS / "_hooks"))
    try:
        import reference
    finally:
        sys.path.remove(str(DOCS / "_hooks"))
    return reference


def test_every_test_named_in_the_reliability_table_exists():
    text = (DOCS / "reliability.md").read_text()
    section = text.split("| bad input | what the user sees | test |", 1)[1]
    named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", section)
    assert len(named) >= 30
    missing = [f"{f}::{n}" for f, n in named if not (ROOT / f).is_file() or n not in _defined_tests(ROOT / f)]
    assert not missing, missing


def test_every_test_file_and_bench_script_the_pages_name_exists():
    # a package that `regfw new-plugin my_noise` writes has files of its own (docs/plugins.md)
    generated = {str(p.relative_to(ROOT / "templates" / "plugin")).replace("{{name}}", "my_noise")[:-len(".tmpl")]
                 for p in (ROOT / "templates" / "plugin").rglob("*.tmpl")}
    missing = []
    for page in PAGES:
        text = page.read_text()
        for path, name in re.findall(r"(tests/[\w/]+\.py)::(\w+)", text):
            if not (ROOT / path).is_file() or name not in _defined_tests(ROOT / path):
                missing.append(f"{page.name}: {path}::{name}")
        for path in re.findall(r"\b((?:tests|bench)/[\w/.-]+\.(?:py|yaml))\b", text):
            if not (ROOT / path).is_file() and path not in generated:
                missing.append(f"{page.name}: {path}")
    assert not missing, missing


def test_the_readme_is_short_and_lists_every_builtin_regularizer_linked_to_its_section():
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    reference = _reference()
    builtins = {spec.name for spec in reference.builtin_specs()}
    linked = dict(re.findall(r"\[`(\w+)`\]\(docs/regularizers\.md#([\w-]+)\)", text))
    assert set(linked) == builtins, (sorted(builtins - set(linked)), sorted(set(linked) - builtins))
    page = reference.expand((DOCS / "regularizers.md").read_text())
    anchors = _anchors(page)
    assert all(anchor in anchors for anchor in linked.values()), sorted(set(linked.values()) - anchors)


def test_the_readme_links_only_to_pages_and_anchors_that_exist():
    reference = _reference()
    broken = []
    for target, anchor in re.findall(r"\]\((docs/[\w/-]+\.md)(?:#([\w-]+))?\)", README.read_text()):
        path = ROOT / target
        if not path.is_file():
            broken.append(target)
        elif anchor and anchor not in _anchors(reference.expand(path.read_text())):
            broken.append(f"{target}#{anchor}")
    assert not broken, broken


def _anchors(markdown: str) -> set[str]:
    """The ids the site gives the headings of ``markdown`` (Python-Markdown's toc slugify, which
    mkdocs uses; GitHub's agrees for the headings the README links to)."""
    from markdown.extensions.toc import slugify

    headings = re.findall(r"^#{1,6} (.+?)\s*$", re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S), re.M)
    return {slugify(re.sub(r"[`*]", "", h), "-") for h in headings}


def test_every_regfw_name_the_pages_write_as_code_resolves_at_its_current_path():
    """A code span that is a dotted ``regfw.`` path (``regfw.placement.kinds.TRANSFORMER_RANGE``) names a
    module or an attribute that imports from there without a DeprecationWarning: the pages follow
    the layout when modules move."""
    import importlib
    import warnings

    def resolves(path: str) -> bool:
        parts = path.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            try:
                for name in parts[cut:]:
                    obj = getattr(obj, name)
            except AttributeError:
                return False
            return True
        return False

    stale = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for page in PAGES:
            for path in set(re.findall(r"`(regfw(?:\.\w+)+)(?:\(.*?\))?`", page.read_text())):
                try:
                    ok = resolves(path)
                except DeprecationWarning as exc:
                    ok, path = False, f"{path} ({exc})"
                if not ok:
                    stale.append(f"{page.name}: {path}")
    assert not stale, stale
