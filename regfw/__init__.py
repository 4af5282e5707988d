"""regfw: regularization and Monte Carlo dropout uncertainty for PyTorch Lightning, as plugins.

The package root stays light (no torch or Lightning import) so that plugin discovery and
``regfw --help`` are fast. Heavier names are imported on first use.

The public API, the names a plugin may rely on, is listed in ``docs/plugins.md``; the hooks are
documented in ``docs/hooks.md``.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

import pluggy

from regfw import _moved

__version__ = "0.1.0"

#: Marker for hook implementations. Plugins write ``@regfw.hookimpl``.
hookimpl = pluggy.HookimplMarker("regfw")

_LAZY = {
    # what a user trains and samples with
    "RegularizedModule": "regfw.train.module",
    "Regularize": "regfw.train.regularize",
    "load_regularized": "regfw.train.regularize",
    "MCDropoutUncertainty": "regfw.uncertainty.callback",
    "mc_predict": "regfw.uncertainty.sampling",
    "load_config": "regfw.config.schema",
    # for plugin authors (regfw.extend holds all of them)
    "Regularizer": "regfw.extend.regularizer",
    "PlanItem": "regfw.extend.regularizer",
    "PlanContext": "regfw.extend.regularizer",
    "InjectingRegularizer": "regfw.extend.regularizer",
    "InjectionConfig": "regfw.extend.regularizer",
    "StochasticModule": "regfw.layers.base",
    "build_regularizers": "regfw.registry.regularizers",
    "get_registry": "regfw.registry.regularizers",
    "get_plugin_manager": "regfw.registry.discovery",
    "kinds": "regfw.placement.kinds",
}

__all__ = ["__version__", "hookimpl", *_LAZY]

_moved.install()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = import_module(_LAZY[name])
        return module if _LAZY[name].endswith("." + name) else getattr(module, name)
    raise AttributeError(f"module 'regfw' has no attribute {name!r}")
