"""The ``regfw`` command line: one module per command.

``regfw.cli`` was a module in the previous release; its names still resolve here, with a
DeprecationWarning, from :mod:`regfw.cli.main`.
"""
from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    from regfw._moved import forward

    return forward(__name__, name)
