"""Plugin discovery: one pluggy ``PluginManager`` filled from the ``regfw`` entry-point group.

The built-in regularizers (the ``regfw_plugins`` package, source folder ``plugins/``) are
declared as entry points in regfw's own ``pyproject.toml`` and load through exactly this path,
like any third-party package.

Environment variables:

``REGFW_LOAD_PLUGINS``
    Unset: load every installed plugin. Set: a comma-separated list of the third-party entry
    point names to load; empty loads the built-ins only. The built-ins are always loaded.
``REGFW_TRACE_PLUGINS``
    ``1`` prints every hook call, its implementations and its results to stderr.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata

import pluggy

from regfw import hookspecs
from regfw.errors import PluginError

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


_lock = threading.Lock()
_pm: pluggy.PluginManager | None = None
_origins: dict[str, PluginInfo] = {}


def _selected_names() -> set[str] | None:
    raw = os.environ.get("REGFW_LOAD_PLUGINS")
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def _entry_points() -> list[metadata.EntryPoint]:
    eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
    # Entry-point order is undefined; sort so that loading (and any error) is deterministic.
    return sorted(eps, key=lambda ep: (getattr(ep.dist, "name", "") != BUILTIN_DISTRIBUTION, ep.name))


def _tracing() -> bool:
    return os.environ.get("REGFW_TRACE_PLUGINS", "") not in ("", "0")


def _trace_line(text: str) -> None:
    print(f"[regfw trace] {text}", file=sys.stderr, flush=True)


def _short(value: object, limit: int = 100, *, text: bool = False) -> str:
    """``repr(value)`` (``str`` with ``text=True``) on one line, cut to ``limit`` characters."""
    out = " ".join((str(value) if text else repr(value)).split())
    return out if len(out) <= limit else out[: limit - 3] + "..."


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
        args = ", ".join(f"{k}={_short(v)}" for k, v in kwargs.items())
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
            result = _short(outcome.get_result())
        except BaseException as exc:  # noqa: BLE001 - tracing reports, it does not handle
            result = f"raised {type(exc).__name__}: {_short(exc, 200, text=True)}"
        _trace_line(f"  {hook_name} -> {result} ({elapsed:.1f} ms)")

    pm.add_hookcall_monitoring(before, after)


def _load(pm: pluggy.PluginManager) -> None:
    selected = _selected_names()
    seen: dict[str, str] = {}
    for ep in _entry_points():
        dist = ep.dist.name if ep.dist is not None else None
        version = ep.dist.version if ep.dist is not None else None
        builtin = dist == BUILTIN_DISTRIBUTION
        if not builtin and selected is not None and ep.name not in selected:
            if _tracing():
                _trace_line(f"skip plugin {ep.name!r} ({dist} {version}): not in REGFW_LOAD_PLUGINS")
            continue
        if ep.name in seen:
            if seen[ep.name] == dist:
                continue  # the same distribution seen twice on sys.path
            raise PluginError(
                f"two distributions declare the regfw plugin {ep.name!r}: {seen[ep.name]} and {dist}; "
                f"uninstall one of them"
            )
        seen[ep.name] = dist or "?"
        try:
            plugin = ep.load()
        except Exception as exc:  # noqa: BLE001 - reported with its origin
            raise PluginError(
                f"plugin {ep.name!r} (entry point '{ep.name} = {ep.value}' of distribution "
                f"{dist} {version}) failed to import: {type(exc).__name__}: {exc}. "
                f"Fix or uninstall it, or leave it out with REGFW_LOAD_PLUGINS."
            ) from exc
        register_plugin(plugin, ep.name, distribution=dist, version=version, builtin=builtin, pm=pm)


def register_plugin(
    plugin: object,
    name: str,
    *,
    distribution: str | None = None,
    version: str | None = None,
    builtin: bool = False,
    pm: pluggy.PluginManager | None = None,
) -> None:
    """Register a plugin object (a module or class instance with hook implementations).

    Entry points call this during discovery; tests and notebooks may call it directly. Hook
    names are checked at once: a misspelled ``regfw_*`` hook is a :class:`PluginError`.
    """
    pm = pm or get_plugin_manager()
    try:
        pm.register(plugin, name=name)
        pm.check_pending()
    except (pluggy.PluginValidationError, ValueError) as exc:
        if pm.is_registered(plugin):
            pm.unregister(plugin)
        known = ", ".join(sorted(n for n in dir(hookspecs) if n.startswith("regfw_")))
        raise PluginError(f"plugin {name!r} ({distribution or 'not installed'}): {exc}. Known hooks: {known}") from exc
    module = getattr(plugin, "__name__", type(plugin).__module__)
    _origins[name] = PluginInfo(name, module, distribution, version, builtin)
    if _tracing():
        hooks = ", ".join(sorted(h.name for h in pm.get_hookcallers(plugin) or ())) or "none"
        _trace_line(f"register plugin {name!r} ({distribution or 'not installed'} {version or ''}".rstrip()
                    + f"; module {module}): hooks {hooks}")


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
            try:
                _load(pm)
            except BaseException:
                _origins.clear()
                raise
            _pm = pm
        return _pm


def reset_plugin_manager() -> None:
    """Forget the plugin manager so that the next use rediscovers entry points."""
    global _pm
    with _lock:
        _pm = None
        _origins.clear()


def plugin_infos() -> list[PluginInfo]:
    """Every registered plugin with its origin and the hooks it implements, sorted by name."""
    pm = get_plugin_manager()
    infos = []
    for name, plugin in pm.list_name_plugin():
        hooks = tuple(sorted(h.name for h in pm.get_hookcallers(plugin) or ()))
        base = _origins.get(name) or PluginInfo(name, getattr(plugin, "__name__", repr(plugin)), None, None, False)
        infos.append(PluginInfo(base.name, base.module, base.distribution, base.version, base.builtin, hooks))
    return sorted(infos, key=lambda i: (not i.builtin, i.name))


def origin_of(module_name: str) -> PluginInfo | None:
    """The plugin whose module is ``module_name`` or a parent package of it."""
    best = None
    for info in _origins.values():
        if module_name == info.module or module_name.startswith(info.module + "."):
            if best is None or len(info.module) > len(best.module):
                best = info
    return best
