"""Plugin discovery: one pluggy ``PluginManager`` filled from the ``regfw`` entry-point group.

The built-in regularizers (the ``regfw_plugins`` package, source folder ``plugins/``) are
declared as entry points in regfw's own ``pyproject.toml`` and load through exactly this path,
like any third-party package.

Environment variables:

``REGFW_LOAD_PLUGINS``
    Unset: load every installed plugin. Set: a comma-separated list of the third-party entry
    point names to load (``NAME``, or ``DIST:NAME`` for the one of distribution ``DIST``); empty
    loads the built-ins only. The built-ins are always loaded. A name no installed plugin
    declares is reported with the closest installed name.

Names several distributions share: an entry-point name declared by more than one distribution
(a third-party ``rdrop`` next to the built-in one) loads every one of them, each registered
under its qualified name ``DIST:NAME`` (``regfw:rdrop``, ``regfw-rdrop:rdrop``), where ``DIST``
is the distribution's normalised name (:func:`qualifier`). None wins: regularizer names are
resolved the same way by :mod:`regfw.registry.regularizers`.

A plugin that fails to import, is rejected by pluggy (a misspelled hook) or implements no hook
is recorded as a :class:`PluginFailure` and reported once, as a :class:`PluginWarning`, when
plugins are discovered; every other plugin loads. ``regfw plugins --check`` lists the failures and
exits non-zero (``regfw plugins`` alone lists the entry points, :func:`installed_plugins`, importing
none); selecting a regularizer such a plugin would provide is an error naming it.
``REGFW_TRACE_PLUGINS``
    ``1`` prints every hook call, its implementations and its results to stderr.
"""
from __future__ import annotations

import os
import re
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from importlib import metadata

import pluggy

from regfw.errors import PluginError, closest_hint, short_repr
from regfw.extend import hookspecs

PROJECT = "regfw"
ENTRY_POINT_GROUP = "regfw"
BUILTIN_DISTRIBUTION = "regfw"


@dataclass(frozen=True)
class PluginInfo:
    """Where a loaded plugin came from."""

    name: str
    module: str
    distribution: str | None
    version: str | None
    builtin: bool
    hooks: tuple[str, ...] = field(default=())
    #: ``name = module`` as its distribution declares it; None for a plugin registered at run time.
    entry_point: str | None = None

    @property
    def qualifier(self) -> str:
        """The ``DIST`` of this plugin's qualified regularizer names ``DIST:NAME``: its distribution's
        normalised name, or the plugin's own name for a plugin registered at run time."""
        return qualifier(self.distribution) if self.distribution else self.name


def qualifier(distribution: str) -> str:
    """The normalised distribution name used in qualified names (``DIST:NAME``): lowercase, each run
    of ``-``, ``_`` and ``.`` one ``-`` (PEP 503), so ``regfw_rdrop`` and ``Regfw.Rdrop`` name the
    distribution ``regfw-rdrop``."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


def split_qualified(name: str) -> tuple[str | None, str]:
    """``("regfw-rdrop", "rdrop")`` for ``"regfw-rdrop:rdrop"`` (the qualifier normalised), ``(None, name)``
    for a bare name. The parts are not checked here; callers say what is wrong with them."""
    if ":" not in name:
        return None, name
    dist, _, bare = name.partition(":")
    return qualifier(dist.strip()), bare.strip()


_lock = threading.Lock()
_pm: pluggy.PluginManager | None = None
_origins: dict[str, PluginInfo] = {}


def _selected_names() -> set[str] | None:
    raw = os.environ.get("REGFW_LOAD_PLUGINS")
    if raw is None:
        return None
    names = {part.strip() for part in raw.split(",") if part.strip()}
    # DIST:NAME in any spelling of the distribution's name, as the qualified names are compared
    return {name if ":" not in name else ":".join(p or "" for p in split_qualified(name)) for name in names}


def _dist_name_version(ep: metadata.EntryPoint, cache: dict[int, tuple[str | None, str | None]]
                       ) -> tuple[str | None, str | None]:
    """The name and version of the distribution declaring ``ep``. Each ``dist.name`` /
    ``dist.version`` parses its METADATA file again, so they are read once per distribution
    (the built-ins are one distribution with a dozen entry points)."""
    if ep.dist is None:
        return None, None
    if id(ep.dist) not in cache:
        meta = ep.dist.metadata
        cache[id(ep.dist)] = (meta["Name"], meta["Version"])
    return cache[id(ep.dist)]


def _entry_points() -> list[metadata.EntryPoint]:
    eps = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
    cache: dict[int, tuple[str | None, str | None]] = {}
    # Entry-point order is undefined; sort so that loading (and any error) is deterministic.
    return sorted(eps, key=lambda ep: (_dist_name_version(ep, cache)[0] != BUILTIN_DISTRIBUTION, ep.name,
                                       qualifier(_dist_name_version(ep, cache)[0] or "?")))


def _tracing() -> bool:
    return os.environ.get("REGFW_TRACE_PLUGINS", "") not in ("", "0")


def _trace_line(text: str) -> None:
    print(f"[regfw trace] {text}", file=sys.stderr, flush=True)


def _trace(pm: pluggy.PluginManager) -> None:
    """Print every hook call to stderr: its arguments, the implementations it runs, its result.

    Implementations are listed in the order pluggy calls them (the last registered first,
    after ``tryfirst`` and before ``trylast`` ones), each as ``plugin (module.function)``, so a
    plugin author sees whether their function is called at all and what the call returned.
    """
    local = threading.local()

    def before(hook_name, hook_impls, kwargs):
        caller = getattr(pm.hook, hook_name, None)
        spec = getattr(caller, "spec", None)
        first = " [firstresult]" if spec is not None and spec.opts.get("firstresult") else ""
        args = ", ".join(f"{k}={short_repr(v, 100)}" for k, v in kwargs.items())
        impls = ", ".join(
            f"{impl.plugin_name} ({impl.function.__module__}.{impl.function.__qualname__})"
            for impl in reversed(hook_impls)
        )
        _trace_line(f"call {hook_name}({args}){first}")
        _trace_line(f"  implementations, in call order: {impls or 'none'}")
        local.__dict__.setdefault("starts", []).append(time.perf_counter())

    def after(outcome, hook_name, hook_impls, kwargs):
        elapsed = (time.perf_counter() - local.starts.pop()) * 1000
        try:
            result = short_repr(outcome.get_result(), 100)
        except BaseException as exc:  # noqa: BLE001 - tracing reports, it does not handle
            result = f"raised {type(exc).__name__}: {short_repr(exc, 200, text=True)}"
        _trace_line(f"  {hook_name} -> {result} ({elapsed:.1f} ms)")

    pm.add_hookcall_monitoring(before, after)


class PluginWarning(UserWarning):
    """A plugin did not load (or loaded but provides nothing); the command goes on without it."""


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that did not load or registered nothing, reported once and kept for later messages.

    ``problem`` is ``"import"`` (the module raised on import), ``"invalid"`` (pluggy rejected it,
    e.g. a misspelled hook name), ``"no hooks"`` (the module implements no hook) or ``"unknown"``
    (``REGFW_LOAD_PLUGINS`` names a plugin that is not installed). Two distributions declaring one
    name are not a failure: both load, under qualified names.
    """

    name: str
    problem: str
    detail: str
    entry_point: str | None = None
    distribution: str | None = None
    version: str | None = None

    @property
    def origin(self) -> str:
        where = f"entry point '{self.entry_point}'" if self.entry_point else "no entry point"
        dist = f" of distribution {self.distribution} {self.version or ''}".rstrip() if self.distribution else ""
        return f"plugin {self.name!r} ({where}{dist})"

    def message(self) -> str:
        """One line: which plugin, where it came from, what went wrong and what to do."""
        if self.problem == "unknown":
            return f"REGFW_LOAD_PLUGINS names {self.name!r}, which no installed plugin declares. {self.detail}"
        if self.distribution == BUILTIN_DISTRIBUTION:  # never tell a user to uninstall regfw itself
            return (f"{self.origin} {self.detail}. It is a built-in plugin of regfw: reinstall regfw "
                    f"(pip install --force-reinstall regfw) and report the error if it stays.")
        return f"{self.origin} {self.detail}. Fix or uninstall it, or leave it out with REGFW_LOAD_PLUGINS."


_failures: dict[str, PluginFailure] = {}


def _unmarked_hooks(plugin: object) -> str:
    """Why a registered plugin implements no hook: its ``regfw_*`` functions without the marker."""
    known = sorted(n for n in dir(hookspecs) if n.startswith("regfw_"))
    names = [n for n in dir(plugin) if n.startswith("regfw_") and callable(getattr(plugin, n, None))
             and not hasattr(getattr(plugin, n), f"{PROJECT}_impl")]
    if not names:
        return f"implements no regfw hook (the hooks: {', '.join(known)})"
    hints = "".join(closest_hint(n, known) for n in names if n not in known)
    return (f"implements no regfw hook: {', '.join(names)} lacks the @regfw.hookimpl marker, so pluggy ignores "
            f"it.{hints}")


def _plugin_keys(eps: list[metadata.EntryPoint], names: dict[int, tuple[str | None, str | None]]) -> dict[int, str]:
    """The name each entry point is registered under: its own name, or ``DIST:NAME`` when several
    distributions declare that name (every one of them qualified: none takes the bare name)."""
    dists: dict[str, set[str]] = {}
    for ep in eps:
        dists.setdefault(ep.name, set()).add(qualifier(_dist_name_version(ep, names)[0] or "?"))
    return {id(ep): (f"{qualifier(_dist_name_version(ep, names)[0] or '?')}:{ep.name}"
                     if len(dists[ep.name]) > 1 else ep.name) for ep in eps}


@dataclass(frozen=True)
class Installed:
    """One ``regfw`` entry point as its distribution's metadata declares it, before any import."""

    #: The name it is registered under: the entry-point name, or ``DIST:NAME`` when several
    #: distributions declare that name.
    key: str
    ep: metadata.EntryPoint
    distribution: str | None
    version: str | None
    builtin: bool
    #: False for a third-party plugin that ``REGFW_LOAD_PLUGINS`` leaves out.
    selected: bool

    @property
    def entry_point(self) -> str:
        return f"{self.ep.name} = {self.ep.value}"

    @property
    def module(self) -> str:
        return self.ep.value.partition(":")[0].strip()


def installed_plugins() -> tuple[list[Installed], list[PluginFailure]]:
    """Every installed plugin, from entry-point metadata alone (nothing is imported, so this
    answers in milliseconds), and the ``REGFW_LOAD_PLUGINS`` names no installed plugin declares
    (``"unknown"`` failures). Built-ins first, then by name; one entry per key."""
    selected = _selected_names()
    names: dict[int, tuple[str | None, str | None]] = {}
    eps = _entry_points()
    keys = _plugin_keys(eps, names)
    matched: set[str] = set()
    found: dict[str, Installed] = {}
    third_party: list[str] = []
    for ep in eps:
        dist, version = _dist_name_version(ep, names)
        builtin = dist == BUILTIN_DISTRIBUTION
        key = keys[id(ep)]
        aliases = {ep.name, key, f"{qualifier(dist or '?')}:{ep.name}"}
        if not builtin:
            third_party.append(key)
        if selected is not None:
            matched |= aliases & selected
        if key not in found:  # else the same distribution seen twice on sys.path
            found[key] = Installed(key, ep, dist, version, builtin,
                                   selected is None or builtin or bool(aliases & selected))
    unknown = [PluginFailure(name, "unknown", f"Installed third-party plugins: "
                             f"{', '.join(dict.fromkeys(third_party)) or 'none'}.{closest_hint(name, third_party)}")
               for name in sorted((selected or set()) - matched)]
    return list(found.values()), unknown


def _load(pm: pluggy.PluginManager) -> None:
    """Register every selected entry point; a plugin that fails is recorded in ``_failures``, never fatal."""
    installed, unknown = installed_plugins()
    for item in installed:
        key, dist, version, entry = item.key, item.distribution, item.version, item.entry_point
        if not item.selected:
            if _tracing():
                _trace_line(f"skip plugin {key!r} ({dist} {version}): not in REGFW_LOAD_PLUGINS")
            continue
        try:
            plugin = item.ep.load()
        except Exception as exc:  # noqa: BLE001 - reported with its origin, the others still load
            _failures[key] = PluginFailure(key, "import", f"failed to import: {type(exc).__name__}: {exc}",
                                           entry, dist, version)
            continue
        try:
            register_plugin(plugin, key, distribution=dist, version=version, builtin=item.builtin, pm=pm,
                            entry_point=entry)
        except PluginError as exc:
            _failures[key] = PluginFailure(key, "invalid", f"was rejected: {exc}", entry, dist, version)
            continue
        if not pm.get_hookcallers(plugin):
            _failures[key] = PluginFailure(key, "no hooks", _unmarked_hooks(plugin), entry, dist, version)
    for failure in unknown:
        _failures[failure.name] = failure


def refuse_plugin(name: str, detail: str) -> PluginFailure:
    """Record that plugin ``name`` was refused after it loaded (its hook registered something the
    registry does not accept, see :func:`regfw.registry.regularizers.get_registry`) and warn once: the other
    plugins go on, and selecting one of its regularizers names it."""
    info = _origins.get(name)
    failure = PluginFailure(name, "invalid", f"was refused: {detail}", info.entry_point if info else None,
                            info.distribution if info else None, info.version if info else None)
    if _failures.get(name) != failure:
        _failures[name] = failure
        warnings.warn_explicit(failure.message(), PluginWarning, filename="regfw", lineno=0,
                              module="regfw.registry.discovery")
    return failure


def plugin_failures() -> list[PluginFailure]:
    """The plugins that did not load, or loaded and implement no hook, in load order."""
    get_plugin_manager()
    return list(_failures.values())


def failure_for(name: str) -> PluginFailure | None:
    """The failed plugin that most likely provides regularizer ``name`` (by its plugin or module name)."""
    import difflib

    for failure in _failures.values():
        if failure.problem == "unknown":
            continue
        module = (failure.entry_point or "").split("=")[-1].strip().split(":")[0].split(".")[-1]
        candidates = {failure.name, module, module.removeprefix("regfw_")}
        if name in candidates or any(c and (c in name or name in c) for c in candidates):
            return failure
        if difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.75):
            return failure
    return None


def register_plugin(
    plugin: object,
    name: str,
    *,
    distribution: str | None = None,
    version: str | None = None,
    builtin: bool = False,
    pm: pluggy.PluginManager | None = None,
    entry_point: str | None = None,
) -> None:
    """Register a plugin object (a module or class instance with hook implementations).

    Entry points call this during discovery; tests and notebooks may call it directly. Hook
    names are checked at once: a misspelled ``regfw_*`` hook is a :class:`PluginError` with the
    closest hook name; a plugin that implements no hook at all gets a :class:`PluginWarning`.
    """
    pm = pm or get_plugin_manager()
    try:
        pm.register(plugin, name=name)
        pm.check_pending()
    except (pluggy.PluginValidationError, ValueError) as exc:
        if pm.is_registered(plugin):
            pm.unregister(plugin)
        known = sorted(n for n in dir(hookspecs) if n.startswith("regfw_"))
        marked = [n for n in dir(plugin) if hasattr(getattr(plugin, n, None), f"{PROJECT}_impl") and n not in known]
        hint = "".join(closest_hint(n, known) for n in marked)
        raise PluginError(f"plugin {name!r} ({distribution or 'not installed'}): {exc}.{hint} "
                          f"Known hooks: {', '.join(known)}") from exc
    module = getattr(plugin, "__name__", type(plugin).__module__)
    _origins[name] = PluginInfo(name, module, distribution, version, builtin, entry_point=entry_point)
    if _tracing():
        hooks = ", ".join(sorted(h.name for h in pm.get_hookcallers(plugin) or ())) or "none"
        _trace_line(f"register plugin {name!r} ({distribution or 'not installed'} {version or ''}".rstrip()
                    + f"; module {module}): hooks {hooks}")
    if _pm is not None and pm is _pm and not pm.get_hookcallers(plugin):  # registered at run time
        warnings.warn(f"plugin {name!r} (module {module}) {_unmarked_hooks(plugin)}", PluginWarning, stacklevel=2)


def unregister_plugin(name: str) -> None:
    """Remove the plugin registered under ``name`` (no-op when absent)."""
    pm = get_plugin_manager()
    plugin = pm.get_plugin(name)
    if plugin is not None:
        pm.unregister(plugin)
    _origins.pop(name, None)


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, loading entry points on first use."""
    global _pm
    with _lock:
        if _pm is None:
            pm = pluggy.PluginManager(PROJECT)
            pm.add_hookspecs(hookspecs)
            if _tracing():
                _trace(pm)
            _failures.clear()
            try:
                _load(pm)
            except BaseException:
                _origins.clear()
                raise
            _pm = pm
            for failure in _failures.values():  # once per discovery; the commands go on without them
                # shown as "regfw: PluginWarning: ...", not as a line of whichever caller loaded plugins first
                warnings.warn_explicit(failure.message(), PluginWarning, filename="regfw", lineno=0,
                                       module="regfw.registry.discovery")
        return _pm


def reset_plugin_manager() -> None:
    """Forget the plugin manager so that the next use rediscovers entry points."""
    global _pm
    with _lock:
        _pm = None
        _origins.clear()
        _failures.clear()


def plugin_infos() -> list[PluginInfo]:
    """Every registered plugin with its origin and the hooks it implements, sorted by name."""
    pm = get_plugin_manager()
    infos = []
    for name, plugin in pm.list_name_plugin():
        hooks = tuple(sorted(h.name for h in pm.get_hookcallers(plugin) or ()))
        base = _origins.get(name) or PluginInfo(name, getattr(plugin, "__name__", repr(plugin)), None, None, False)
        infos.append(PluginInfo(base.name, base.module, base.distribution, base.version, base.builtin, hooks,
                                base.entry_point))
    return sorted(infos, key=lambda i: (not i.builtin, i.name))


def origin_of(module_name: str) -> PluginInfo | None:
    """The plugin whose module is ``module_name`` or a parent package of it."""
    best = None
    for info in _origins.values():
        if module_name == info.module or module_name.startswith(info.module + "."):
            if best is None or len(info.module) > len(best.module):
                best = info
    return best
