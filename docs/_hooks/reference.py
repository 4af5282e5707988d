"""The reference parts of the docs, generated from the code each time the site is built.

A page asks for a generated part with a line of its own, ``<!-- generate: NAME -->``; the mkdocs
hook :func:`on_page_markdown` replaces it with :data:`GENERATORS` ``[NAME]()``. So the config
reference is the schema's dataclasses (every key, its type, default, allowed values and the
comment the code gives it) and the regularizer reference is the registry (each built-in plugin's
name, description, docstring, layer kinds and settings): neither is ever written by hand, and a
field added to the code is on the site at the next build.

Where a field's description comes from, first found wins: the ``#:`` comment lines right above it
in its class, the ``doc`` of its field metadata (``regfw.config.schema.rate(doc=...)``), a
````field``: text`` paragraph of its class docstring, the docstring of its own dataclass.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any, Literal

MARKER = re.compile(r"^<!-- generate: ([\w-]+) -->$", re.M)
#: ``Optional[X]`` and ``X | None`` have different origins.
_UNIONS = (typing.Union, types.UnionType)


# -- the descriptions of fields ------------------------------------------------------------------


def _comments(cls: type) -> dict[str, str]:
    """``{field: its #: comment}`` from the source of ``cls`` (empty without source)."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    found: dict[str, str] = {}
    pending: list[str] = []
    for line in lines[1:]:
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
            continue
        match = re.match(r"(\w+)\s*:", stripped)
        if match and pending:
            found[match.group(1)] = " ".join(pending)
        pending = []
    return found


def _docstring_fields(cls: type) -> dict[str, str]:
    """``{field: text}`` from the paragraphs of ``cls``'s own docstring that start ````field``: ``."""
    doc = inspect.cleandoc(cls.__dict__.get("__doc__") or "")
    found: dict[str, str] = {}
    for match in re.finditer(r"^``(\w+)``: (.*?)(?=^``\w+``: |\n\n|\Z)", doc, re.M | re.S):
        found[match.group(1)] = " ".join(match.group(2).split())
    return found


def field_doc(cls: type, f: dataclasses.Field) -> str:
    """What field ``f`` of dataclass ``cls`` is for, from the code (see the module docstring)."""
    for owner in cls.__mro__:
        if f.name not in getattr(owner, "__annotations__", {}):
            continue
        text = _comments(owner).get(f.name) or f.metadata.get("doc") or _docstring_fields(owner).get(f.name)
        if text:
            return sentence(text)
    nested = _nested_type(cls, f)
    if nested is not None and nested.__doc__:
        return first_paragraph(nested.__doc__)
    return ""


def markdown_of(text: str) -> str:
    """reStructuredText inline markup of docstrings as Markdown: ````x```` and ``:mod:`a.b``` as
    code, ``:class:`~a.b.C``` as ``C``."""
    text = re.sub(r":\w+:`~[\w.]*?(\w+)`", r"`\1`", text)
    text = re.sub(r":\w+:`([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def sentence(text: str) -> str:
    """``text`` as Markdown, starting with a capital and ending with a full stop."""
    text = markdown_of(" ".join(text.split()))
    if text and text[0].islower():
        text = text[0].upper() + text[1:]
    return text if not text or text.endswith((".", "...", "!", "?")) else text + "."


def first_paragraph(doc: str) -> str:
    """The first paragraph of a docstring, without a leading ````section:```` that names the key."""
    text = " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())
    return sentence(re.sub(r"^``[\w.]+(:)?``:?\s*", "", text))


# -- types, defaults and allowed values ------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - a hint that does not resolve is shown as written
        return {f.name: f.type for f in dataclasses.fields(cls)}


def _nested_type(cls: type, f: dataclasses.Field) -> type | None:
    """The dataclass a field holds (a sub-section such as ``uncertainty.ood``), or None."""
    tp = _hints(cls).get(f.name, f.type)
    candidates = list(typing.get_args(tp)) if typing.get_origin(tp) in _UNIONS else [tp]
    for candidate in candidates:
        if isinstance(candidate, type) and dataclasses.is_dataclass(candidate):
            return candidate
    return None


def type_text(tp: Any) -> str:
    """A type as a reader of a YAML file thinks of it: ``number``, ``one of `a`, `b```, ``null``."""
    if isinstance(tp, str):
        return tp
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(f"`{_yaml(a)}`" for a in typing.get_args(tp))
    if origin in _UNIONS:
        return " or ".join(type_text(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "`null`"
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {type_text(args[0])}" if args else "list"
    if tp is dict or origin is dict:
        return "mapping"
    if tp is Any:
        return "any"
    names = {bool: "true/false", int: "whole number", float: "number", str: "string"}
    if tp in names:
        return names[tp]
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def _yaml(value: Any) -> str:
    """``value`` written as in a YAML file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    return str(value)


def default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return f"`{_yaml(f.default)}`"
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return "(section)" if dataclasses.is_dataclass(value) else f"`{_yaml(value)}`"
    return "required"


def allowed_text(f: dataclasses.Field) -> str:
    """The range a field's metadata declares (``[0, 1)``, ``> 0``), or nothing."""
    spec = f.metadata.get("range")
    return f"`{spec[2]}`" if spec and len(spec) > 2 else ""


# -- tables of keys ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Key:
    """One config key: its dotted path and what the reference says of it."""

    path: str
    type: str
    default: str
    allowed: str
    doc: str


def keys_of(cls: type, prefix: str, *, expand: bool = True) -> Iterator[Key]:
    """Every key of dataclass ``cls`` below ``prefix``, sub-sections expanded after their own row
    (or, with ``expand=False``, named in it)."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        path = f"{prefix}.{f.name}" if prefix else f.name
        doc = field_doc(cls, f)
        nested = _nested_type(cls, f)
        if nested is not None and not expand:
            inner = ", ".join(f"`{g.name}`" for g in dataclasses.fields(nested) if g.init)
            doc = f"{doc} Its keys: {inner} ([Config reference](config.md)).".strip()
        yield Key(path, type_text(hints.get(f.name, f.type)), default_text(f), allowed_text(f), doc)
        if nested is not None and expand:
            yield from keys_of(nested, path)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def key_table(keys: list[Key]) -> str:
    rows = ["| key | type | default | what it is |", "|---|---|---|---|"]
    for key in keys:
        what = key.doc + (f" Allowed: {key.allowed}." if key.allowed else "")  # key.doc ends a sentence
        rows.append(f"| `{key.path}` | {_cell(key.type)} | {_cell(key.default)} | {_cell(what.strip())} |")
    return "\n".join(rows)


# -- the config reference ------------------------------------------------------------------------


def config_sections() -> list[tuple[str, type | None, str]]:
    """``(section, its dataclass or None, its description)`` in the order of ``TOP_LEVEL``."""
    from regfw.config import schema as config

    classes: dict[str, type] = {"data": config.DataConfig, "model": config.ModelConfig,
                                "optimizer": config.OptimizerConfig, "lr_scheduler": config.LRSchedulerConfig,
                                "uncertainty": config.UncertaintyConfig, "run": config.RunConfig}
    out = []
    for name in config.TOP_LEVEL:
        cls = classes.get(name)
        out.append((name, cls, first_paragraph(cls.__doc__ or "") if cls else ""))
    return out


def config_reference() -> str:
    """Every key of a config file, section by section, from the schema."""
    from regfw.config.schema import TRAINER_DEFAULTS
    from regfw.config.trainer import OWNED
    from regfw.config.trainer_args import TRAINER_ARGUMENTS

    parts: list[str] = []
    for name, cls, description in config_sections():
        parts.append(f"### `{name}`\n")
        if name == "seed":
            parts.append("`seed`: whole number, default `0`, from 0 to 2**32 - 1. Seeds the model's initial "
                         "weights, the data split and order, and every dropout mask (see "
                         "[Distributed and fault tolerance](distributed.md)).\n")
        elif name == "regularizers":
            parts.append("A mapping of regularizer names to their settings (`{}` or null: all defaults; `false` "
                         "leaves one out, so an override can switch it off). The keys of every built-in "
                         "regularizer:\n")
            for spec in builtin_specs():
                parts.append(f"#### `regularizers.{spec.name}`\n")
                parts.append(key_table(list(keys_of(spec.cls.Config, f"regularizers.{spec.name}"))) + "\n")
        elif name == "trainer":
            parts.append("Any argument of `pytorch_lightning.Trainer`, by value (checked without importing "
                         "Lightning). regfw's defaults:\n")
            parts.append("| key | default |\n|---|---|\n" + "\n".join(
                f"| `trainer.{k}` | `{_yaml(v)}` |" for k, v in TRAINER_DEFAULTS.items()) + "\n")
            parts.append("Set by regfw for every run, so refused in a config:\n")
            parts.append("| key | why |\n|---|---|\n" + "\n".join(
                f"| `trainer.{k}` | {_cell(why)} |" for k, why in OWNED.items()) + "\n")
            rest = [k for k in TRAINER_ARGUMENTS if k not in TRAINER_DEFAULTS and k not in OWNED]
            parts.append("The other keys, with Lightning's defaults: " + ", ".join(f"`trainer.{k}`" for k in rest)
                         + ".\n")
        elif cls is not None:
            parts.append(f"{description}\n")
            parts.append(key_table(list(keys_of(cls, name))) + "\n")
    return "\n".join(parts)


# -- the regularizer reference -------------------------------------------------------------------


def builtin_specs() -> list:
    """The registered built-in regularizers (those of the ``regfw`` distribution), by name."""
    from regfw.registry.regularizers import get_registry

    return sorted((s for s in get_registry().all_specs() if s.builtin), key=lambda s: s.name)


def _kinds_text(cls: type) -> str:
    kinds = getattr(cls, "kinds", ())
    return ", ".join(f"`{k}`" for k in kinds) if kinds else ""


def module_text(spec: Any, specs: list) -> str:
    """What the plugin's module docstring says of ``spec``: all of it when the module registers only
    this regularizer, else its bullets naming ``spec`` (or its first paragraph)."""
    module = inspect.getmodule(spec.cls)
    doc = inspect.cleandoc(module.__doc__ or "") if module else ""
    if sum(s.cls.__module__ == spec.cls.__module__ for s in specs) > 1:
        paragraphs = re.split(r"\n(?=\* )|\n\n", doc)
        own = [p for p in paragraphs if p.startswith("* ") and re.match(rf"\* ``{spec.name}``", p)]
        doc = "\n".join(own) if own else paragraphs[0]
    doc = re.sub(r"::$", ":", doc, flags=re.M)  # reST's literal-block marker; the indented block stays code
    return markdown_of(definition_lists(doc))


def definition_lists(doc: str) -> str:
    """reST definition lists (a term line, its definition indented right below it) as Markdown
    bullets: ``- **term**: definition``. An indented block after a blank line (a literal block)
    is left as it is."""
    def item(match: re.Match[str]) -> str:
        body = " ".join(line.strip() for line in match.group(2).splitlines())
        return f"- **{match.group(1).strip()}**: {body}\n"

    return re.sub(r"^(\S[^\n]*)\n((?:    [^\n]*(?:\n|$))+)", item, doc, flags=re.M)


def regularizer_reference() -> str:
    """One section per built-in regularizer: what the registry and the plugin's code say of it."""
    parts: list[str] = []
    specs = builtin_specs()
    for spec in specs:
        cls = spec.cls
        parts.append(f"### `{spec.name}`\n")
        if cls.description:
            parts.append(f"{sentence(cls.description)}\n")
        facts = [f"plugin module `{cls.__module__}`, class `{cls.__qualname__}`"]
        if getattr(cls, "family", ""):
            facts.append(f"family `{cls.family}`")
        if _kinds_text(cls):
            facts.append(f"layer kinds {_kinds_text(cls)}")
        parts.append("- " + "; ".join(facts) + ".\n")
        text = module_text(spec, specs)
        if text:
            parts.append(text + "\n")
        doc = markdown_of(inspect.cleandoc(cls.__doc__ or ""))
        if doc and doc not in text:
            parts.append(doc + "\n")
        keys = list(keys_of(cls.Config, f"regularizers.{spec.name}", expand=False))
        if keys:
            parts.append(f"Settings, under `regularizers.{spec.name}`:\n")
            parts.append(key_table(keys) + "\n")
    return "\n".join(parts)


def regularizer_list() -> str:
    """A table of the built-in regularizers, each linked to its section."""
    rows = ["| regularizer | what it does |", "|---|---|"]
    for spec in builtin_specs():
        rows.append(f"| [`{spec.name}`](regularizers.md#{spec.name}) | {_cell(spec.cls.description)} |")
    return "\n".join(rows) + "\n"


def extend_api() -> str:
    """The API reference of ``regfw.extend``, the plugin door: one entry per name of its ``__all__``, in
    that order, rendered by mkdocstrings from the object's own module; constants in a table."""
    import regfw.extend as door

    entries: list[str] = []
    constants: list[str] = []
    for name in door.__all__:
        value = getattr(door, name)
        if inspect.ismodule(value):
            entries.append(f"### `{name}`\n\nThe module `{value.__name__}`: {first_paragraph(value.__doc__ or '')}\n")
        elif inspect.isclass(value) or inspect.isfunction(value):
            entries.append(f"::: {value.__module__}.{value.__qualname__}\n    options:\n      heading_level: 3\n"
                           f"      show_root_full_path: false\n")
        elif callable(value):  # a marker object (hookimpl), documented by its type
            entries.append(f"### `{name}`\n\n{first_paragraph(type(value).__doc__ or '')}\n")
        else:
            constants.append(f"| `{name}` | `{_cell(repr(value))}` |")
    table = "### Constants\n\n| name | value |\n|---|---|\n" + "\n".join(constants) + "\n" if constants else ""
    return "\n".join(entries) + "\n" + table


GENERATORS: dict[str, Callable[[], str]] = {
    "config": config_reference,
    "regularizers": regularizer_reference,
    "regularizer-list": regularizer_list,
    "extend-api": extend_api,
}


def expand(markdown: str) -> str:
    """``markdown`` with every ``<!-- generate: NAME -->`` line replaced by its generated part."""
    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            raise ValueError(f"<!-- generate: {name} -->: no such generator; known: {', '.join(GENERATORS)}")
        return GENERATORS[name]().rstrip() + "\n"

    return MARKER.sub(one, markdown)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """The mkdocs hook: generated parts are filled in before the page is rendered."""
    return expand(markdown)
