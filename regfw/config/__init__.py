"""The configuration: bounded YAML, the schema dataclasses, validation by key and by value.

``regfw.config`` was a module in the previous release; its names still resolve here, with a
DeprecationWarning, from :mod:`regfw.config.schema`.
"""
from __future__ import annotations

from typing import Any

from regfw._moved import forward


def __getattr__(name: str) -> Any:
    return forward(__name__, name)
