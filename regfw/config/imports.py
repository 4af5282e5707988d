"""User classes by dotted path: the one way a config's ``class_path`` (model, data, loss, optimizer,
scheduler) becomes an object, with a :class:`ConfigError` naming the key when it cannot."""
from __future__ import annotations

import importlib

from regfw.errors import ConfigError


def import_class(class_path: str, key: str) -> type:
    """The object at ``pkg.module.Class``, or a :class:`ConfigError` naming ``key``."""
    module_name, _, attr = class_path.rpartition(".")
    if not module_name:
        raise ConfigError(f"{key}: got {class_path!r}, expected a dotted path like 'mypkg.models.Net'.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{key}: cannot import module {module_name!r} of {class_path!r}: {exc}. "
                          f"Is the package installed in this environment?") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{key}: module {module_name!r} has no attribute {attr!r}.") from None
