"""The registry of regularizers, filled by the plugins' ``regfw_register_regularizers`` hooks."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from regfw.errors import ConfigError, closest_hint
from regfw.plugins import PluginError, failure_for, get_plugin_manager, origin_of, plugin_failures
from regfw.regularizer import Regularizer
from regfw.validation import validate_dataclass


@dataclass(frozen=True)
class RegularizerSpec:
    """A registered regularizer: its class and the plugin it came from."""

    name: str
    cls: type[Regularizer]
    plugin: str
    distribution: str | None

    @property
    def origin(self) -> str:
        where = f"{self.cls.__module__}.{self.cls.__qualname__}"
        return f"plugin {self.plugin!r} ({self.distribution or 'not installed'}, {where})"


class Registry:
    """Name -> :class:`RegularizerSpec`."""

    def __init__(self) -> None:
        self.specs: dict[str, RegularizerSpec] = {}

    def register(self, cls: type, name: str | None = None) -> None:
        """Register ``cls`` under ``name`` (default ``cls.name``). Duplicates are errors."""
        if not (isinstance(cls, type) and issubclass(cls, Regularizer)):
            raise PluginError(f"register() takes a regfw.Regularizer subclass, got {cls!r}")
        name = name or cls.name
        if not name or not name.isidentifier():
            raise PluginError(f"regularizer {cls.__qualname__} needs a `name` that is an identifier, got {name!r}")
        if not dataclasses.is_dataclass(cls.Config):
            raise PluginError(f"regularizer {name!r}: Config must be a dataclass, got {cls.Config!r}")
        info = origin_of(cls.__module__)
        spec = RegularizerSpec(name, cls, info.name if info else cls.__module__, info.distribution if info else None)
        if name in self.specs:
            raise PluginError(
                f"regularizer {name!r} is registered twice: by {self.specs[name].origin} and by {spec.origin}; "
                f"uninstall or disable one of them (REGFW_LOAD_PLUGINS)"
            )
        self.specs[name] = spec

    def names(self) -> list[str]:
        return sorted(self.specs)

    def get(self, name: str, key: str = "regularizers") -> RegularizerSpec:
        """The spec of ``name``; unknown: an error naming a failed plugin that may provide it, or the closest name."""
        try:
            return self.specs[name]
        except KeyError:
            pass
        failure = failure_for(name)
        if failure is not None:
            raise PluginError(f"{key}.{name}: regularizer {name!r} is not available: {failure.message()} "
                              f"Run `regfw plugins` to see what is installed.")
        known = self.names()
        failed = [f for f in plugin_failures() if f.problem != "unknown"]
        others = (f" These plugins did not load and may provide it: {'; '.join(f.message() for f in failed)}"
                  if failed else "")
        raise ConfigError(
            f"{key}.{name}: unknown regularizer {name!r}. Known regularizers: "
            f"{', '.join(known) or '(none: no plugin is loaded)'}.{closest_hint(name, known)} "
            f"Run `regfw plugins` to see what is installed.{others}"
        )


_cache: tuple[tuple, Registry] | None = None


def get_registry() -> Registry:
    """The registry of every loaded plugin, built once per set of registered plugins.

    It is rebuilt when a plugin is registered or unregistered (``register_plugin``,
    ``reset_plugin_manager``); otherwise every caller in a run shares one registry.
    """
    global _cache
    pm = get_plugin_manager()
    key = (id(pm), *((name, id(plugin)) for name, plugin in pm.list_name_plugin()))
    if _cache is not None and _cache[0] == key:
        return _cache[1]
    registry = Registry()
    pm.hook.regfw_register_regularizers(register=registry.register)
    _cache = (key, registry)
    return registry


def build_regularizers(section: Mapping[str, Any] | None, registry: Registry | None = None) -> list[Regularizer]:
    """Regularizer objects for a ``regularizers:`` config section (validated on the way), in its order.

    ``section`` maps names to their settings (a mapping, or None/``{}`` for all defaults).
    A name mapped to ``false`` is left out, so an override can switch one off. Build them once
    per run and pass the objects on (``RegularizedModule(regularizers=objects)`` uses them as
    they are); the order is the order their step methods run in (see :mod:`regfw.steps`).
    """
    registry = registry or get_registry()
    out: list[Regularizer] = []
    for name, settings in (section or {}).items():
        if settings is False:
            continue
        spec = registry.get(str(name))
        cfg = validate_dataclass(spec.cls.Config, settings or {}, f"regularizers.{name}")
        reg = spec.cls(cfg)
        reg.name = spec.name
        out.append(reg)
    return out
