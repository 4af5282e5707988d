"""Module paths of the previous release, kept working for one release with a DeprecationWarning.

regfw's modules moved into sub-packages by concern (``regfw.surgery`` -> ``regfw.placement.surgery``).
Importing an old path imports the new module under the old name too and warns once. Five old modules
became packages of the same name (``regfw.config``, ``regfw.run``, ``regfw.cli``, ``regfw.placement``,
``regfw.registry``): their ``__init__`` forwards the old module's names through :func:`forward`.
Plugin authors import from :mod:`regfw.extend` instead.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any

#: old module path -> new module path
MOVED: dict[str, str] = {
    "regfw.atomic": "regfw.run.atomic",
    "regfw.batch": "regfw.train.batch",
    "regfw.callback": "regfw.train.regularize",
    "regfw.checkpoint_compat": "regfw.run.checkpoint_compat",
    "regfw.checkpoint_trust": "regfw.run.checkpoint_trust",
    "regfw.checkpoints": "regfw.run.checkpoints",
    "regfw.cli": "regfw.cli.main",
    "regfw.config": "regfw.config.schema",
    "regfw.contract": "regfw.extend.contract",
    "regfw.data": "regfw.build.datasets",
    "regfw.dataflow": "regfw.placement.dataflow",
    "regfw.demo": "regfw.cli.demo",
    "regfw.distributed": "regfw.run.distributed",
    "regfw.epoch_metrics": "regfw.train.epoch_metrics",
    "regfw.factory": "regfw.build.factory",
    "regfw.finite_inputs": "regfw.cli.finite_inputs",
    "regfw.foreign": "regfw.placement.foreign",
    "regfw.hookspecs": "regfw.extend.hookspecs",
    "regfw.kinds": "regfw.placement.kinds",
    "regfw.lightning_data": "regfw.build.lightning_data",
    "regfw.models": "regfw.build.models",
    "regfw.module": "regfw.train.module",
    "regfw.optim": "regfw.train.optim",
    "regfw.params": "regfw.train.params",
    "regfw.placement": "regfw.placement.api",
    "regfw.plan": "regfw.placement.plan",
    "regfw.plan_items": "regfw.placement.plan_items",
    "regfw.plugin_blame": "regfw.registry.blame",
    "regfw.plugins": "regfw.registry.discovery",
    "regfw.predict": "regfw.cli.predict",
    "regfw.rank_command": "regfw.cli.rank",
    "regfw.registry": "regfw.registry.regularizers",
    "regfw.regularizer": "regfw.extend.regularizer",
    "regfw.run": "regfw.run.job",
    "regfw.rundir": "regfw.run.rundir",
    "regfw.scaffold": "regfw.cli.new_plugin",
    "regfw.schedule_callback": "regfw.train.schedule_callback",
    "regfw.schedules": "regfw.train.schedules",
    "regfw.step_hooks": "regfw.train.step_hooks",
    "regfw.steps": "regfw.train.steps",
    "regfw.stopping": "regfw.run.stopping",
    "regfw.structure": "regfw.placement.structure",
    "regfw.surgery": "regfw.placement.surgery",
    "regfw.targets": "regfw.train.targets",
    "regfw.test_command": "regfw.cli.testing",
    "regfw.tracing": "regfw.placement.tracing",
    "regfw.trainer_args": "regfw.config.trainer_args",
    "regfw.trainer_config": "regfw.config.trainer",
    "regfw.unified": "regfw.train.unified",
    "regfw.validation": "regfw.config.validation",
    "regfw.yaml_limits": "regfw.config.yaml_limits",
}


def _warn(old: str, new: str, stacklevel: int) -> None:
    warnings.warn(f"{old} moved to {new}; the old path is removed in the next release "
                  f"(plugin authors: import from regfw.extend)", DeprecationWarning, stacklevel=stacklevel)


class _Alias(importlib.abc.Loader):
    def __init__(self, old: str, new: str) -> None:
        self.old, self.new = old, new

    def create_module(self, spec: Any) -> ModuleType:
        _warn(self.old, self.new, stacklevel=8)
        return importlib.import_module(self.new)

    def exec_module(self, module: ModuleType) -> None:
        """The new module is already executed; importing it under the old name changes nothing."""


class _OldPaths(importlib.abc.MetaPathFinder):
    """Finds ``regfw.<old>`` for every moved module whose old name is not a package now."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        new = MOVED.get(fullname)
        if new is None or new.rsplit(".", 1)[0] == fullname:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(fullname, new))


def install() -> None:
    """Put the finder of old paths on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _OldPaths) for f in sys.meta_path):
        sys.meta_path.append(_OldPaths())


def forward(package: str, name: str) -> Any:
    """A name of the old module ``package`` (now a package), from the module it moved to.

    A submodule of the package is never forwarded: ``from regfw.run import stopping`` asks the
    package for ``stopping`` before it imports ``regfw.run.stopping``, and answering from the old
    module would import it (and torch, and Lightning) and warn on a path that is not old."""
    if importlib.util.find_spec(f"{package}.{name}") is not None:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    new = MOVED[package]
    module = importlib.import_module(new)
    try:
        value = getattr(module, name)
    except AttributeError:
        raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
    _warn(f"{package}.{name}", f"{new}.{name}", stacklevel=4)
    return value
