"""Bad-input cases by area, collected by ``tests/cli/test_badinput.py``.

Each module here defines ``cases(root, tmp) -> list[tuple[list[str], str]]``: command lines for
``regfw.cli.main.main`` and the text the one error line must contain. ``root`` is a directory holding a
finished one-epoch run (``root/c.yaml``, ``root/run/checkpoints/last.ckpt``); ``tmp`` is the working
directory of the test (``tmp/c.yaml`` holds the good config), where a module makes the files it
needs. Every case must exit 2 with one line naming the key, file or plugin, write nothing and
change nothing under either directory.
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

Case = tuple[list[str], str]


def area_cases(root: Path, tmp: Path) -> list[Case]:
    """The cases of every area module, in module order."""
    cases: list[Case] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        cases += module.cases(root, tmp)
    return cases
