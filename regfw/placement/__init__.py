"""Where regularizers go: the traced graph, layer kinds, the rules of placement and the plan.

``regfw.placement`` was a module in the previous release; its names still resolve here, with a
DeprecationWarning, from :mod:`regfw.placement.api`.
"""
from __future__ import annotations

from typing import Any

from regfw._moved import forward


def __getattr__(name: str) -> Any:
    return forward(__name__, name)
