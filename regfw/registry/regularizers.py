"""The registry of regularizers, filled by the plugins' ``regfw_register_regularizers`` hooks.

Every regularizer has a qualified name ``DIST:NAME``: ``NAME`` is what its class registers and
``DIST`` the normalised name of the distribution that provides it (``regfw`` for the built-ins;
the plugin's own name for a plugin registered at run time). A config selects it by the bare
``NAME`` when exactly one installed plugin registers that name, and by ``DIST:NAME`` always. When
several do (a third-party ``rdrop`` next to the built-in one, or two third-party plugins), each
stays usable by its qualified name and the bare name is an error naming every choice: no
provider, the built-ins included, ever takes a shared name over silently, whichever was
installed first.
"""
from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from regfw.config.validation import validate_dataclass
from regfw.errors import ConfigError, closest_hint
from regfw.extend.regularizer import Regularizer, check_overrides
from regfw.registry.discovery import (
    BUILTIN_DISTRIBUTION,
    PluginError,
    PluginInfo,
    failure_for,
    get_plugin_manager,
    origin_of,
    plugin_failures,
    plugin_infos,
    refuse_plugin,
    split_qualified,
)


@dataclass(frozen=True)
class RegularizerSpec:
    """A registered regularizer: its class, the plugin it came from and its qualifier (``DIST`` of
    ``DIST:NAME``)."""

    name: str
    cls: type[Regularizer]
    plugin: str
    distribution: str | None
    qualifier: str = ""

    @property
    def qualified_name(self) -> str:
        return f"{self.qualifier}:{self.name}"

    @property
    def builtin(self) -> bool:
        return self.distribution == BUILTIN_DISTRIBUTION

    @property
    def origin(self) -> str:
        where = f"{self.cls.__module__}.{self.cls.__qualname__}"
        return f"plugin {self.plugin!r} ({self.distribution or 'not installed'}, {where})"


class Registry:
    """Qualified name ``DIST:NAME`` -> :class:`RegularizerSpec`, and the rules that resolve a
    config's name (bare or qualified) to one of them."""

    def __init__(self) -> None:
        self._specs: dict[str, RegularizerSpec] = {}

    def register(self, cls: type, name: str | None = None, *, plugin: PluginInfo | None = None) -> None:
        """Register ``cls`` under ``name`` (default ``cls.name``) for ``plugin`` (default: the plugin
        whose module defines ``cls``). One provider registering one name twice is an error; two
        providers sharing a name are not (both are kept, see the module docstring)."""
        if not (isinstance(cls, type) and issubclass(cls, Regularizer)):
            raise PluginError(f"register() takes a regfw.Regularizer subclass, got {cls!r}")
        name = name or cls.name
        if not name or not name.isidentifier():
            raise PluginError(f"regularizer {cls.__qualname__} needs a `name` that is an identifier, got {name!r}")
        if not dataclasses.is_dataclass(cls.Config):
            raise PluginError(f"regularizer {name!r}: Config must be a dataclass, got {cls.Config!r}")
        check_overrides(cls)
        info = plugin or origin_of(cls.__module__)
        spec = RegularizerSpec(name, cls, info.name if info else cls.__module__, info.distribution if info else None,
                               info.qualifier if info else cls.__module__)
        if spec.qualified_name in self._specs:
            raise PluginError(
                f"regularizer {name!r} is registered twice by one provider ({spec.qualifier}): by "
                f"{self._specs[spec.qualified_name].origin} and by {spec.origin}; register each name once"
            )
        self._specs[spec.qualified_name] = spec

    def all_specs(self) -> list[RegularizerSpec]:
        """Every registered regularizer, by qualified name."""
        return [self._specs[k] for k in sorted(self._specs)]

    def providers(self, name: str) -> list[RegularizerSpec]:
        """The regularizers registered under the bare ``name``: the built-in first, then by qualified name."""
        found = [s for s in self._specs.values() if s.name == name]
        return sorted(found, key=lambda s: (not s.builtin, s.qualified_name))

    def selection_name(self, spec: RegularizerSpec) -> str:
        """How a config selects ``spec``: its bare name when no other provider registers it, else
        its qualified name."""
        return spec.name if len(self.providers(spec.name)) == 1 else spec.qualified_name

    @property
    def specs(self) -> dict[str, RegularizerSpec]:
        """Selection name (see :meth:`selection_name`) -> spec, sorted."""
        return {self.selection_name(s): s for s in sorted(self._specs.values(), key=self.selection_name)}

    def names(self) -> list[str]:
        """The names a config can use as they are: bare names with one provider, qualified names of
        the shared ones."""
        return list(self.specs)

    def __contains__(self, name: object) -> bool:
        """Whether ``name`` (bare or qualified) names an installed regularizer (a shared bare name
        too: resolving it is :meth:`get`'s error, which names the choices)."""
        if not isinstance(name, str):
            return False
        dist, bare = split_qualified(name)
        return f"{dist}:{bare}" in self._specs if dist is not None else bool(self.providers(bare))

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str, key: str = "regularizers") -> RegularizerSpec:
        """The spec ``name`` (bare or ``DIST:NAME``) selects; a :class:`ConfigError` (or a
        :class:`PluginError` naming a failed plugin that may provide it) saying what to write
        instead when it selects none, or several."""
        where = f"{key}.{name}"
        dist, bare = split_qualified(name)
        if dist is not None:
            return self._get_qualified(where, name, dist, bare)
        found = self.providers(name)
        if len(found) == 1:
            return found[0]
        if found:
            choices = " or ".join(f"{s.qualified_name!r} ({self._describe(s)})" for s in found)
            writes = "; ".join(f"{key}: {{{s.qualified_name}: {{...}}}}" for s in found)
            raise ConfigError(
                f"{where}: the regularizer name {name!r} is ambiguous: {len(found)} installed plugins register it, "
                f"{choices}. Select one by its qualified name DIST:NAME: {writes}."
            )
        failure = failure_for(name)
        if failure is not None:
            raise PluginError(f"{where}: regularizer {name!r} is not available: {failure.message()} "
                              f"Run `regfw plugins` to see what is installed.")
        known = self.names()
        failed = [f for f in plugin_failures() if f.problem != "unknown"]
        others = (f" These plugins did not load and may provide it: {'; '.join(f.message() for f in failed)}"
                  if failed else "")
        raise ConfigError(
            f"{where}: unknown regularizer {name!r}. Known regularizers: "
            f"{', '.join(known) or '(none: no plugin is loaded)'}.{closest_hint(name, known)} "
            f"Run `regfw plugins` to see what is installed.{others}"
        )

    @staticmethod
    def _describe(spec: RegularizerSpec) -> str:
        what = "built-in" if spec.builtin else f"distribution {spec.distribution}" if spec.distribution else \
            f"plugin {spec.plugin!r} registered at run time"
        return f"{what}, {spec.cls.__module__}.{spec.cls.__qualname__}"

    def _get_qualified(self, where: str, name: str, dist: str, bare: str) -> RegularizerSpec:
        """The spec of a qualified name, or an error for an empty part, an unknown distribution or a
        name that distribution does not provide."""
        qualifiers = sorted({s.qualifier for s in self._specs.values()})
        if not dist or not bare or ":" in bare:
            part = ("more than one ':'" if ":" in bare else "an empty distribution" if not dist else "an empty name")
            own = [s.qualified_name for s in self.all_specs() if s.qualifier == dist] or \
                [s.qualified_name for s in self.all_specs()]
            example = next(iter(difflib.get_close_matches(f"{dist or 'regfw'}:{bare.rpartition(':')[2]}", own, n=1,
                                                          cutoff=0.0)), None)
            raise ConfigError(
                f"{where}: {name!r} has {part}; a qualified regularizer name is DIST:NAME, one ':' between the "
                f"distribution that provides it and the regularizer's name"
                f"{f' (e.g. {example!r})' if example else ''}, or write the bare NAME. Run `regfw plugins` to see "
                f"the qualified names."
            )
        spec = self._specs.get(f"{dist}:{bare}")
        if spec is not None:
            return spec
        if dist not in qualifiers:
            others = [s.qualified_name for s in self.providers(bare)]
            hint = (f" {bare!r} is installed as {' and '.join(others)}." if others
                    else closest_hint(dist, qualifiers))
            raise ConfigError(
                f"{where}: no installed plugin distribution is called {dist!r}; distributions providing "
                f"regularizers: {', '.join(qualifiers) or 'none'}.{hint} Install it or correct the DIST part of "
                f"{name!r}. Run `regfw plugins` to see the qualified names."
            )
        offered = sorted(s.qualified_name for s in self._specs.values() if s.qualifier == dist)
        hint = closest_hint(f"{dist}:{bare}", offered)
        raise ConfigError(
            f"{where}: distribution {dist!r} provides no regularizer {bare!r}.{hint} It provides: "
            f"{', '.join(offered)}. Run `regfw plugins` to see the qualified names."
        )


def section_key(reg: Regularizer, registry: Registry | None = None) -> str:
    """The key ``reg`` goes under in a ``regularizers:`` section (a config, a checkpoint's
    hyperparameters) so that it selects this very regularizer again: the key it was built from
    (:func:`build_regularizers`), else how a config selects its class now (the bare name unless
    another plugin registers it too)."""
    chosen = getattr(reg, "selected_as", None)
    if isinstance(chosen, str) and chosen:
        return chosen
    registry = registry or get_registry()
    for spec in registry.all_specs():
        if spec.cls is type(reg) and spec.name == reg.name:
            return registry.selection_name(spec)
    return reg.name


_cache: tuple[tuple, Registry] | None = None


class Registrar:
    """The ``register(cls, name=None)`` a plugin's hook receives: it registers for that plugin, so a
    class is credited to the plugin that registered it, whatever module defines it."""

    def __init__(self, registry: Registry, info: PluginInfo | None, plugin: str) -> None:
        self.registry, self.info, self.plugin = registry, info, plugin

    def __call__(self, cls: type, name: str | None = None) -> None:
        self.registry.register(cls, name, plugin=self.info)

    def __repr__(self) -> str:
        return f"<register for plugin {self.plugin!r}>"


def get_registry() -> Registry:
    """The registry of every loaded plugin, built once per set of registered plugins.

    It is rebuilt when a plugin is registered or unregistered (``register_plugin``,
    ``reset_plugin_manager``); otherwise every caller in a run shares one registry. Each plugin's
    hook is called on its own, with a ``register`` bound to that plugin. A plugin whose
    registration is refused (a :class:`PluginError`: a name it registers twice, a class that is
    not a regularizer or overrides ``apply_row``) contributes nothing and is reported once as a
    :class:`~regfw.registry.discovery.PluginWarning` and in ``plugin_failures()``; the others are used.
    """
    global _cache
    pm = get_plugin_manager()
    key = (id(pm), *((name, id(plugin)) for name, plugin in pm.list_name_plugin()))
    if _cache is not None and _cache[0] == key:
        return _cache[1]
    registry = Registry()
    infos = {info.name: info for info in plugin_infos()}
    plugins = dict(pm.list_name_plugin())
    for impl in reversed(pm.hook.regfw_register_regularizers.get_hookimpls()):  # pluggy's call order
        others = [p for n, p in plugins.items() if n != impl.plugin_name]
        caller = pm.subset_hook_caller("regfw_register_regularizers", remove_plugins=others)
        before = set(registry._specs)
        try:
            caller(register=Registrar(registry, infos.get(impl.plugin_name), impl.plugin_name))
        except PluginError as exc:  # refused: none of its regularizers, the others go on
            for added in set(registry._specs) - before:
                del registry._specs[added]
            refuse_plugin(impl.plugin_name, str(exc))
    _cache = (key, registry)
    return registry


def _selected(section: Mapping[str, Any] | None, registry: Registry) -> Iterator[tuple[str, Any, Any]]:
    """``(key, spec, validated settings)`` of each regularizer a ``regularizers:`` section selects."""
    seen: dict[str, str] = {}
    for name, settings in (section or {}).items():
        if settings is False:
            continue
        spec = registry.get(str(name))
        if spec.name in seen:
            raise ConfigError(
                f"regularizers.{name}: {name!r} and {seen[spec.name]!r} both select a regularizer named "
                f"{spec.name!r}, and one run takes one regularizer of a name (its inserted modules, plan rows and "
                f"logged terms are named by it); remove one of them."
            )
        seen[spec.name] = str(name)
        yield str(name), spec, validate_dataclass(spec.cls.Config, settings or {}, f"regularizers.{name}")


def resolve_section(section: Mapping[str, Any] | None, registry: Registry | None = None) -> dict[str, dict]:
    """A ``regularizers:`` section validated and completed, as plain data: each selected key with
    every setting of its regularizer (defaults filled in). No regularizer object is made: that is
    :func:`build_regularizers`' job, once per run."""
    return {key: dataclasses.asdict(settings) for key, _, settings in _selected(section, registry or get_registry())}


def build_regularizers(section: Mapping[str, Any] | None, registry: Registry | None = None, *,
                       config: Any = None) -> list[Regularizer]:
    """Regularizer objects for a ``regularizers:`` config section (validated on the way), in its order.

    ``section`` maps names (bare, or qualified ``DIST:NAME``) to their settings (a mapping, or
    None/``{}`` for all defaults). A name mapped to ``false`` is left out, so an override can switch
    one off. Build them once per run and pass the objects on (``RegularizedModule(regularizers=objects)``
    uses them as they are); the order is the order their step methods run in (see :mod:`regfw.train.steps`).
    Each object's ``name`` is the registered (bare) name, which names its inserted modules, plan rows
    and logged terms; ``selected_as`` is the section's key. Two keys selecting regularizers of one
    bare name (``regfw:rdrop`` and ``regfw-rdrop:rdrop``) are an error: those names would clash.
    ``config``: the whole resolved config, which each object's :meth:`~regfw.Regularizer.check` then
    sees (what :func:`regfw.build.parts.build_parts` passes).
    """
    out: list[Regularizer] = []
    for key, spec, settings in _selected(section, registry or get_registry()):
        reg = spec.cls(settings)
        reg.name = spec.name
        reg.selected_as = key
        out.append(reg)
    if config is not None:
        for reg in out:
            reg.check(config)
    return out
