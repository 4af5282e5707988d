"""Plugin discovery and the registry of regularizers the plugins register.

``regfw.registry`` was a module in the previous release; its names still resolve here, with a
DeprecationWarning, from :mod:`regfw.registry.regularizers`.
"""
from __future__ import annotations

from typing import Any

from regfw._moved import forward


def __getattr__(name: str) -> Any:
    return forward(__name__, name)
