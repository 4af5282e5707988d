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

__version__ = "0.1.0"

#: Marker for hook implementations. Plugins write ``@regfw.hookimpl``.
hookimpl = pluggy.HookimplMarker("regfw")

_LAZY = {
    "RegularizedModule": "regfw.module",
    "Regularizer": "regfw.regularizer",
    "PlanItem": "regfw.regularizer",
    "PlanContext": "regfw.regularizer",
    "InjectingRegularizer": "regfw.regularizer",
    "InjectionConfig": "regfw.regularizer",
    "StochasticModule": "regfw.layers.base",
    "load_config": "regfw.config",
    "build_regularizers": "regfw.registry",
    "get_registry": "regfw.registry",
    "get_plugin_manager": "regfw.plugins",
    "kinds": "regfw.kinds",
}

__all__ = ["__version__", "hookimpl", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = import_module(_LAZY[name])
        return module if _LAZY[name].endswith("." + name) else getattr(module, name)
    raise AttributeError(f"module 'regfw' has no attribute {name!r}")
