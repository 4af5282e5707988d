"""The generated reference pages: every config key is on the site, each with what it is for.

The generator (docs/_hooks/reference.py) reads the schema's dataclasses and the registry; these
tests walk the same classes on their own and look for each key in the generated Markdown, so a key
the generator skipped, or one whose code gives no description, fails here.
"""
from __future__ import annotations

import dataclasses
import re
import sys
import typing
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"
sys.path.insert(0, str(DOCS / "_hooks"))
import reference  # noqa: E402 - the generator lives beside the pages, not in a package

sys.path.remove(str(DOCS / "_hooks"))


def dotted_keys(cls: type, prefix: str) -> list[str]:
    """Every key of dataclass ``cls`` below ``prefix``, sub-sections included."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        keys.append(f"{prefix}.{f.name}")
        options = typing.get_args(hints[f.name]) or (hints[f.name],)
        for option in options:
            if isinstance(option, type) and dataclasses.is_dataclass(option):
                keys.extend(dotted_keys(option, f"{prefix}.{f.name}"))
    return keys


def rows(markdown: str) -> dict[str, str]:
    """``{key: its description cell}`` of the key tables in ``markdown``."""
    found = {}
    for line in markdown.splitlines():
        match = re.match(r"\| `([\w.]+)` \|(?:[^|]|\\\|)*\|(?:[^|]|\\\|)*\| (.*) \|$", line)
        if match:
            found[match.group(1)] = match.group(2)
    return found


@pytest.fixture(scope="module")
def config_page() -> str:
    return reference.expand((DOCS / "config.md").read_text())


def test_the_config_page_has_every_key_of_every_section_with_a_description(config_page):
    from regfw.config.schema import TOP_LEVEL

    documented = rows(config_page)
    expected = []
    for name, cls, _ in reference.config_sections():
        assert name in TOP_LEVEL
        if cls is not None:
            expected.extend(dotted_keys(cls, name))
    for spec in reference.builtin_specs():
        expected.extend(dotted_keys(spec.cls.Config, f"regularizers.{spec.name}"))
    assert len(expected) > 150
    missing = [k for k in expected if k not in documented]
    assert not missing, f"keys not on the config page: {missing}"
    bare = [k for k in expected if len(re.sub(r"\s*Allowed: .*$", "", documented[k]).split()) < 3]
    assert not bare, f"keys whose code gives no description (a #: comment or doc=): {bare}"
    assert [name for name, _, _ in reference.config_sections()] == list(TOP_LEVEL)


def test_the_config_page_names_every_trainer_argument_and_what_regfw_sets(config_page):
    from regfw.config.trainer import OWNED
    from regfw.config.trainer_args import TRAINER_ARGUMENTS

    for name in TRAINER_ARGUMENTS:
        assert f"`trainer.{name}`" in config_page, name
    for name, why in OWNED.items():
        assert f"| `trainer.{name}` | {why}" in config_page.replace("\\|", "|")


def test_every_builtin_regularizer_has_a_section_with_its_description_and_settings():
    page = reference.expand((DOCS / "regularizers.md").read_text())
    specs = reference.builtin_specs()
    assert len(specs) >= 20
    for spec in specs:
        section = page.split(f"\n### `{spec.name}`\n", 1)[1].split("\n### ", 1)[0]
        assert reference.sentence(spec.cls.description) in section
        assert f"`{spec.cls.__module__}`" in section
        for key in (f.name for f in dataclasses.fields(spec.cls.Config) if f.init):
            assert f"| `regularizers.{spec.name}.{key}` |" in section, (spec.name, key)


def test_an_unknown_generator_is_an_error_naming_the_known_ones():
    with pytest.raises(ValueError, match=r"<!-- generate: nope -->: no such generator; known: config, "):
        reference.expand("<!-- generate: nope -->\n")


def test_the_extend_api_page_has_every_name_of_the_plugin_door():
    import regfw.extend as door

    page = reference.expand((DOCS / "api" / "extend.md").read_text())
    for name in door.__all__:
        assert re.search(rf"(::: [\w.]+\.{name}$|^### `{name}`$|^\| `{name}` \|)", page, re.M), name
