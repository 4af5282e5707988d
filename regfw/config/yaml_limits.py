"""Bounded YAML: every YAML text regfw reads is measured before OmegaConf sees it.

OmegaConf turns each alias (``*name``) into a copy of the node it names, and does so before any
key is checked: a 600-byte document with eight levels of nine-fold aliases stands for 9**8, about
43 million, nodes and would take hours and gigabytes to build. :func:`check_yaml` walks PyYAML's
event stream once (no node is built, no alias expanded) and counts the nodes the expanded
document would have, with each anchor's expanded size and height remembered, so an alias costs
one dictionary look-up. It stops at the first event past a limit, so a bomb is refused after
reading at most :data:`MAX_NODES` events, in milliseconds.

The limits, each far above what a regfw config needs:

* :data:`MAX_BYTES`: a config is a few kilobytes; the pure-Python YAML parser reads about
  200 KB a second, so a larger file is refused from its size alone, before it is read.
* :data:`MAX_DEPTH`: configs nest fewer than ten levels (``regularizers.dropout.schedule.x``);
  OmegaConf recurses several Python frames per level, so a thousand levels would end in a
  ``RecursionError`` deep inside it.
* :data:`MAX_NODES`: a config has a few hundred keys and values; OmegaConf spends about 0.1 ms
  per node (creation and merge), so ten thousand nodes take about a second.
* :data:`MAX_KEY_CHARS`: a key is a name of a few dozen characters.

The same check applies to config files (:func:`read_config_text`), to the values of ``KEY=VALUE``
overrides and to the configs of run directories read for ``--resume``: all of them go through
:func:`regfw.config.schema.load_raw`. Interpolations (``${a.b}``) are the other way OmegaConf copies
nodes, when it resolves them; :func:`check_interpolations` measures the resolved config the same
way, against the same node and size limits, before anything is resolved.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]  # PyYAML ships no type hints

from regfw.errors import ConfigError, short_repr

#: The largest config file or override value, in bytes (256 KiB).
MAX_BYTES = 256 * 1024
#: The most levels of nodes, counted after alias expansion (``a: {b: 1}``: the top mapping, the
#: mapping under ``a``, and the value 1 make three).
MAX_DEPTH = 32
#: The most nodes (keys, values, mappings, lists) a document may have once its aliases are expanded.
MAX_NODES = 10_000
#: The longest key of a config or an override (a real one has a few dozen characters; a longer one
#: is a value or a file pasted in the wrong place, and would make every message about it huge).
MAX_KEY_CHARS = 200


#: What YAML reads as null (``~``, ``null``, an empty plain scalar), as PyYAML's resolver has it.
_NULL = re.compile(r"~|null|Null|NULL|")


@dataclass
class _Open:
    """A mapping or list being read: its expanded size and height so far."""

    anchor: str | None
    mapping: bool
    path: str
    size: int = 1
    height: int = 0
    index: int = 0  # the next list index, or in a mapping: even = a key comes next
    key: str | None = None


@dataclass
class YamlShape:
    """What :func:`check_yaml` measured: the expanded node count and depth, whether the top level
    is a mapping, and the 1-based line of every key (``optimizer.lr``, ``data.init_args.x[0]``)."""

    nodes: int = 0
    depth: int = 0
    top: str = "empty"
    lines: dict[str, int] = field(default_factory=dict)


def _child_path(frame: _Open) -> str:
    if frame.mapping:
        key = frame.key if frame.key is not None else "?"
        return f"{frame.path}.{key}" if frame.path else key
    return f"{frame.path}[{frame.index}]"


def check_yaml(text: str, source: str) -> YamlShape:
    """Measure the YAML document ``text`` (named ``source`` in messages) without expanding it.

    Raises :class:`~regfw.errors.ConfigError` (one line naming ``source``, the line, the limit
    and the fix) when the document is larger, deeper or expands to more nodes than the limits,
    holds more than one document, uses an alias before its anchor or a list or mapping as a key.
    A YAML syntax error propagates as :class:`yaml.YAMLError` for the caller to word.
    """
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise too_large(source, len(text.encode("utf-8", "surrogatepass")))
    shape = YamlShape()
    sizes: dict[str, tuple[int, int]] = {}  # anchor -> (expanded size, height)
    stack: list[_Open] = []
    documents = 0

    one_line = "\n" not in text.rstrip("\n")

    def where(event: yaml.Event) -> str:
        return source if one_line else f"{source}, line {event.start_mark.line + 1}"

    def add(size: int, height: int, anchor: str | None) -> None:
        """A finished node of ``size`` expanded nodes and ``height`` levels below it."""
        if anchor is not None:
            sizes[anchor] = (size, height)
        if not stack:
            return
        parent = stack[-1]
        parent.size += size
        parent.height = max(parent.height, height + 1)
        parent.index += 1

    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.DocumentStartEvent):
            documents += 1
            if documents > 1:
                raise ConfigError(f"{where(event)}: a second YAML document ('---'); a config is one document. "
                                  f"Remove the '---' line or split the file.")
            continue
        if not isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent, yaml.MappingStartEvent,
                                  yaml.SequenceStartEvent, yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            continue
        parent = stack[-1] if stack else None
        at_key = parent is not None and parent.mapping and parent.index % 2 == 0
        if isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            done = stack.pop()
            add(done.size, done.height, done.anchor)
            continue
        if isinstance(event, yaml.AliasEvent):
            if event.anchor not in sizes:
                raise ConfigError(f"{where(event)}: the alias *{event.anchor} names no anchor defined before it; "
                                  f"define &{event.anchor} first or remove the alias.")
            size, height = sizes[event.anchor]
            alias = f"*{event.anchor}"
        else:
            size, height, alias = 1, 0, ""
        if parent is None:
            shape.top = "mapping" if isinstance(event, yaml.MappingStartEvent) else "other"
        if at_key and not isinstance(event, yaml.ScalarEvent):
            what = "an alias" if alias else "a list" if isinstance(event, yaml.SequenceStartEvent) else "a mapping"
            raise ConfigError(f"{where(event)}: a key that is {what}; config keys are names such as lr. Write "
                              f"the key as plain text.")
        shape.nodes += size
        depth = len(stack) + 1 + height
        if shape.nodes > MAX_NODES:
            how = f" (the alias {alias} alone stands for {size} nodes)" if alias else ""
            raise ConfigError(f"{where(event)}: the document expands to more than {MAX_NODES} nodes{how}, the "
                              f"limit for a config (one has a few hundred); remove the aliases that repeat large "
                              f"lists or mappings, or split the file.")
        if depth > MAX_DEPTH:
            how = f" through the alias {alias}" if alias else ""
            raise ConfigError(f"{where(event)}: nesting deeper than {MAX_DEPTH} levels{how}, the limit for a "
                              f"config (one nests fewer than ten); flatten the lists and mappings.")
        shape.depth = max(shape.depth, depth)
        if isinstance(event, yaml.ScalarEvent) and at_key:
            assert parent is not None
            if len(event.value) > MAX_KEY_CHARS:
                raise ConfigError(f"{where(event)}: a key of {len(event.value)} characters "
                                  f"({short_repr(event.value, 40)}), more than the {MAX_KEY_CHARS} a config key "
                                  f"may have; config keys are names such as lr.")
            if event.implicit[0] and _NULL.fullmatch(event.value):
                raise ConfigError(f"{where(event)}: a key that is null ({event.value or 'empty'}); config keys are "
                                  f"names such as lr. Write the key, or quote it.")
            parent.key = event.value
            shape.lines.setdefault(_child_path(parent), event.start_mark.line + 1)
            add(1, 0, event.anchor)
        elif isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            path = _child_path(parent) if parent is not None else ""
            stack.append(_Open(event.anchor, isinstance(event, yaml.MappingStartEvent), path))
        elif isinstance(event, yaml.AliasEvent):
            add(size, height, None)
        else:
            add(1, 0, event.anchor)
    return shape


def too_large(source: str, size: int) -> ConfigError:
    """The error for ``source`` of ``size`` bytes, over :data:`MAX_BYTES`."""
    return ConfigError(f"{source}: {size} bytes, more than the {MAX_BYTES} bytes ({MAX_BYTES // 1024} KiB) a config "
                       f"may have (one is a few kilobytes); pass the config file, not a data file.")


#: Byte-order marks and the encodings they announce (YAML allows UTF-8, UTF-16 and UTF-32).
_BOMS = ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),
         (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))


def read_config_text(path: Path) -> str:
    """The text of config file ``path``: refused from its size before it is read (over
    :data:`MAX_BYTES`), decoded as UTF-8 (or UTF-16/32 with a byte-order mark, as YAML allows);
    binary content is a :class:`~regfw.errors.ConfigError` naming the file."""
    source = f"config file {str(path)!r}"
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_BYTES:
            raise too_large(source, size)
        data = f.read(MAX_BYTES + 1)  # a file whose size the OS does not know (a pipe, /proc) is read up to the limit
    if len(data) > MAX_BYTES:
        raise too_large(source, len(data))
    encoding = next((enc for bom, enc in _BOMS if data.startswith(bom)), "utf-8")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source} is not {encoding.upper()} text (byte {short_repr(data[exc.start:exc.start + 1])} "
                          f"at offset {exc.start}); save it as UTF-8 YAML, or pass the config file, not a binary "
                          f"one.") from None
    if "\x00" in text:
        raise ConfigError(f"{source} holds NUL characters (offset {text.index(chr(0))}): a binary file, or UTF-16 "
                          f"without a byte-order mark; save it as UTF-8 YAML.")
    return text.removeprefix("\ufeff")


#: One ``${...}`` with no interpolation inside it (nested ones are found first, then their hosts).
_INTERPOLATION = re.compile(r"\$\{([^${}]*)\}")
#: A resolved string counts as this many characters per node it stands for (a container
#: interpolated into a string becomes its text).
_CHARS_PER_NODE = 8


def check_interpolations(tree: Any, source: str, lines: dict[str, int] | None = None) -> None:
    """Measure what resolving the ``${...}`` interpolations of ``tree`` (plain containers, not
    resolved) would build, without resolving them.

    OmegaConf copies the node an interpolation names, and concatenates the text of string
    interpolations, so nine-fold references over a few levels are a bomb just like aliases
    (four levels of lists: 2 s; five levels of strings: 12 s, ten times more per level). Each
    node's resolved size (nodes, characters) is computed once, with the sizes of the nodes it
    names; a resolver's arguments that name a key count as references to it. Raises
    :class:`~regfw.errors.ConfigError` naming the key (and its line in ``lines``) when the
    resolved config would exceed :data:`MAX_NODES` nodes or :data:`MAX_BYTES` characters, or
    when interpolations chain more than :data:`MAX_DEPTH` deep.
    """
    nodes: dict[str, Any] = {}
    _flatten(tree, "", nodes)
    memo: dict[str, tuple[int, int, int]] = {}  # path -> (nodes, characters, interpolation chain)
    active: set[str] = set()

    def named(path: str) -> str:
        key = re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", path)
        line = (lines or {}).get(key)
        return f"{source}, line {line}: {key}" if line else f"{source}: {key}"

    def size(path: str, chain: int) -> tuple[int, int, int]:
        if path in memo:
            return memo[path]
        if path in active or path not in nodes:
            return 1, 0, 0  # a cycle or a missing key: OmegaConf names those itself
        active.add(path)
        value = nodes[path]
        if isinstance(value, (dict, list)):
            kids = [size(_join(path, k), chain) for k in (value if isinstance(value, dict) else range(len(value)))]
            result = (1 + sum(k[0] for k in kids), sum(k[1] for k in kids), max((k[2] for k in kids), default=0))
        elif isinstance(value, str) and "${" in value:
            if chain >= MAX_DEPTH:
                raise _chained(named(path))
            result = _string_size(value, path, nodes, lambda ref: size(ref, chain + 1))
        else:
            result = (1, len(str(value)), 0)
        active.discard(path)
        memo[path] = result
        if result[2] > MAX_DEPTH:
            raise _chained(named(path))
        if result[0] > MAX_NODES or result[1] > MAX_BYTES:
            what = f"{result[0]} nodes" if result[0] > MAX_NODES else f"{result[1]} characters"
            raise ConfigError(f"{named(path) if path else source}: its ${{...}} interpolations resolve to {what}, "
                              f"more than a config may have ({MAX_NODES} nodes, {MAX_BYTES} characters); "
                              f"interpolate the large lists or strings fewer times.")
        return result

    size("", 0)


def _chained(where: str) -> ConfigError:
    return ConfigError(f"{where}: interpolations chained more than {MAX_DEPTH} deep (a ${{...}} naming a key whose "
                       f"value is another ${{...}}, and so on); refer to the final value directly.")


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _flatten(value: Any, path: str, out: dict[str, Any]) -> None:
    out[path] = value
    if isinstance(value, dict):
        for key, child in value.items():
            _flatten(child, _join(path, key), out)
    elif isinstance(value, list):
        for index, child in enumerate(value):
            _flatten(child, _join(path, index), out)


def _target(ref: str, path: str) -> str:
    """The absolute key an interpolation names from the node at ``path`` (``.x``: a sibling,
    ``..x``: a sibling of the parent; ``a[0].b`` as ``a.0.b``)."""
    ref = re.sub(r"\[(\d+)\]", r".\1", ref.strip())
    if not ref.startswith("."):
        return ref
    dots = len(ref) - len(ref.lstrip("."))
    parts = path.split(".") if path else []
    base = parts[: max(len(parts) - dots, 0)]
    return ".".join([*base, ref.lstrip(".")]) if ref.lstrip(".") else ".".join(base)


def _string_size(value: str, path: str, nodes: dict[str, Any],
                 size: Callable[[str], tuple[int, int, int]]) -> tuple[int, int, int]:
    """(nodes, characters, chain) of a string with interpolations, resolved."""
    refs: list[str] = []
    for body in _INTERPOLATION.findall(value):
        head, colon, args = body.partition(":")
        if not colon:
            refs.append(_target(head, path))
            continue
        refs += [t for t in (_target(a, path) for a in args.split(",") if a.strip()) if t in nodes]
    parts = [size(ref) for ref in refs if ref != path]
    chain = 1 + max((p[2] for p in parts), default=0)
    whole = _INTERPOLATION.fullmatch(value.strip())
    if whole is not None and ":" not in whole.group(1) and parts:  # '${a}': the node a itself
        return parts[0][0], parts[0][1], chain
    literal = len(_INTERPOLATION.sub("", value))
    return 1, literal + sum(c + _CHARS_PER_NODE * n for n, c, _ in parts), chain
