"""``regfw new-plugin``: generate a ready-to-install third-party plugin package.

The template lives in the ``regfw_templates`` package (source folder ``templates/plugin/``), so
it ships with a plain ``pip install regfw``. Every template file ends in ``.tmpl`` (so that
neither setuptools nor pytest mistakes the templates for code of regfw itself); the suffix is
dropped on output. ``{{key}}`` in file contents and in path parts is replaced by the values of
:func:`template_context`; an unknown key is an error rather than text left in the output.

The package is written into a temporary folder next to the target and renamed into place at
the end, so a failure never leaves a half-written ``regfw-NAME/`` behind.
"""
from __future__ import annotations

import keyword
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata, resources
from importlib.util import find_spec
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from regfw import __version__
from regfw.errors import RegfwError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from importlib.resources.abc import Traversable

TEMPLATE_PACKAGE = "regfw_templates"
TEMPLATE_DIR = "plugin"
SUFFIX = ".tmpl"

_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_]\w*)\s*\}\}")


@dataclass(frozen=True)
class NewPlugin:
    """What :func:`new_plugin` wrote: the package folder and its files (relative, sorted)."""

    name: str
    path: Path
    files: tuple[str, ...]


def distribution_name(name: str) -> str:
    """The distribution (PyPI project) name of plugin ``name``: ``my_noise`` -> ``regfw-my-noise``."""
    return "regfw-" + name.replace("_", "-")


def package_name(name: str) -> str:
    """The import package of plugin ``name``: ``my_noise`` -> ``regfw_my_noise``."""
    return f"regfw_{name}"


def class_name(name: str) -> str:
    """The class-name stem of plugin ``name``: ``my_noise`` -> ``MyNoise``."""
    return "".join(part[:1].upper() + part[1:] for part in name.split("_") if part)


def template_context(name: str) -> dict[str, str]:
    """The values substituted for ``{{key}}`` in the template."""
    return {
        "name": name,
        "package": package_name(name),
        "dist": distribution_name(name),
        "class_name": class_name(name),
        "regfw_version": __version__,
    }


def render(text: str, context: dict[str, str], where: str = "template") -> str:
    """``text`` with every ``{{key}}`` replaced by ``context[key]``.

    An unknown key is a :class:`ValueError` naming it and ``where``: a typo in the template
    must fail here, not produce a package that contains ``{{nmae}}``.
    """

    def substitute(match: re.Match) -> str:
        key = match.group(1)
        if key not in context:
            raise ValueError(f"{where}: unknown template key {{{{{key}}}}}; known keys: {', '.join(sorted(context))}")
        return context[key]

    return _PLACEHOLDER.sub(substitute, text)


def _walk(node: Traversable, prefix: PurePosixPath) -> Iterator[tuple[PurePosixPath, Traversable]]:
    for child in sorted(node.iterdir(), key=lambda c: c.name):
        if child.name == "__pycache__":
            continue
        rel = prefix / child.name
        if child.is_dir():
            yield from _walk(child, rel)
        elif child.name.endswith(SUFFIX):
            yield rel, child


def template_files() -> list[tuple[PurePosixPath, Traversable]]:
    """``(relative path, resource)`` for every file of the plugin template, sorted by path."""
    root = resources.files(TEMPLATE_PACKAGE).joinpath(TEMPLATE_DIR)
    if not root.is_dir():
        raise RegfwError(
            f"the plugin template {TEMPLATE_PACKAGE}/{TEMPLATE_DIR} is missing from this regfw installation; "
            f"reinstall regfw (pip install --force-reinstall regfw)"
        )
    return list(_walk(root, PurePosixPath()))


def render_template(name: str) -> dict[str, str]:
    """The generated package as ``{relative path: text}``, without writing anything."""
    context = template_context(name)
    out: dict[str, str] = {}
    for rel, resource in template_files():
        target = render(str(rel)[: -len(SUFFIX)], context, str(rel))
        out[target] = render(resource.read_text(encoding="utf-8"), context, str(rel))
    return out


def _taken_names() -> dict[str, str]:
    """Names a new plugin may not take, each with what already uses it."""
    taken: dict[str, str] = {}
    for ep in metadata.entry_points(group="regfw"):
        dist = ep.dist.name if ep.dist is not None else "?"
        taken.setdefault(ep.name, f"the regfw plugin {ep.name!r} of distribution {dist}")
    try:
        from regfw.registry.regularizers import get_registry

        for spec in get_registry().specs.values():
            taken.setdefault(spec.name, f"the regularizer {spec.name!r} of {spec.origin}")
    except RegfwError:
        pass  # a broken third-party plugin: the entry-point names above still guard every plugin
    return taken


def check_name(name: str, directory: str | Path = ".") -> Path:
    """The target folder for plugin ``name`` in ``directory``, or a :class:`RegfwError` saying why not.

    ``name`` becomes the entry-point name, the regularizer's config name and part of the
    package names, so it must be a lowercase Python identifier that no installed plugin,
    regularizer or module ``regfw_<name>`` already uses, and the folder must not exist.
    """
    if not isinstance(name, str) or not _NAME.match(name) or keyword.iskeyword(name):
        suggestion = re.sub(r"[^a-z0-9_]+", "_", str(name).lower()).strip("_")
        if suggestion and not suggestion[0].isalpha():
            suggestion = "my_" + suggestion
        hint = (f" such as {suggestion!r}"
                if suggestion and _NAME.match(suggestion) and not keyword.iskeyword(suggestion) else "")
        raise RegfwError(
            f"plugin name {name!r} is not a lowercase Python identifier (letters a-z, digits and "
            f"underscores, starting with a letter, not a Python keyword); choose another name{hint}"
        )
    taken = _taken_names()
    if name in taken:
        raise RegfwError(
            f"plugin name {name!r} is already taken by {taken[name]}; two plugins with one name cannot be "
            f"installed together, so choose another name (see `regfw plugins`)"
        )
    if find_spec(package_name(name)) is not None:
        raise RegfwError(
            f"plugin name {name!r}: a module named {package_name(name)!r} is already importable, so the "
            f"generated package would clash with it; choose another name"
        )
    from regfw.run.atomic import kind_of

    blocking = next((p for p in (Path(directory), *Path(directory).parents)
                     if kind_of(p) not in (None, "directory") and not p.is_dir()), None)
    if blocking is not None:
        raise RegfwError(f"--dir {str(directory)!r}: {str(blocking)!r} is a {kind_of(blocking)}, not a directory; "
                         f"give a directory to create regfw-{name.replace('_', '-')}/ in")
    target = Path(directory) / distribution_name(name)
    if target.exists() or target.is_symlink():
        raise RegfwError(
            f"{str(target)!r} already exists; choose another name or --dir, or remove that folder first"
        )
    return target


def new_plugin(name: str, directory: str | Path = ".", files: dict[str, str] | None = None) -> NewPlugin:
    """Write the plugin package ``regfw-NAME/`` into ``directory`` (created if missing).

    Everything is written into a temporary folder next to the target first and renamed into
    place at the end: on any failure nothing is left behind. ``files`` replaces the rendered
    template (for tests of the atomic write).
    """
    target = check_name(name, directory)
    files = render_template(name) if files is None else files
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    except OSError as exc:  # a read-only place, a name too long
        from regfw.run.atomic import os_error_line

        raise RegfwError(os_error_line(exc, exc.filename or parent, "cannot create the plugin folder in")) from None
    try:
        for rel, text in files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        tmp.chmod(0o777 & ~_umask())
        if target.exists() or target.is_symlink():  # appeared while we were writing
            raise RegfwError(f"{str(target)!r} appeared while the plugin was being written; nothing was changed")
        os.rename(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):  # a full disk, a quota: nothing was left
            from regfw.run.atomic import os_error_line

            raise RegfwError(os_error_line(exc, target, "cannot write the plugin folder")) from None
        raise
    return NewPlugin(name, target, tuple(sorted(files)))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
