"""Running a config: the run directory, checkpoints, resume, signals and several processes.

``regfw.run`` was a module in the previous release; its names still resolve here, with a
DeprecationWarning, from :mod:`regfw.run.job`.
"""
from __future__ import annotations

from typing import Any

from regfw._moved import forward


def __getattr__(name: str) -> Any:
    return forward(__name__, name)
