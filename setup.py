"""The package list, found rather than written by hand.

``pyproject.toml`` maps each import package to its source folder (``[tool.setuptools] package-dir``:
``regfw_plugins`` is built from ``plugins/``, ``regfw_templates`` from ``templates/``).
setuptools' own ``packages.find`` names what it finds after the folders, so it cannot build a renamed
package; this file finds every sub-package below each mapped folder (any folder with an
``__init__.py``) and names it under its import package, so a new sub-package can never be left out
of the wheel. Everything else is configured in ``pyproject.toml``.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def packages() -> list[str]:
    """Every import package and sub-package that ``pyproject.toml``'s package-dir maps to a folder."""
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    found = []
    for name, folder in package_dir.items():
        found.append(name)
        found.extend(f"{name}.{sub}" for sub in find_packages(str(ROOT / folder)))
    return sorted(found)


setup(packages=packages())
