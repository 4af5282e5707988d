"""Third-party plugins as real distributions for tests: a ``*.dist-info`` folder with ``METADATA`` and
an ``entry_points.txt`` in the ``regfw`` group, beside the plugin's module, in a folder the test puts
on ``sys.path``. ``importlib.metadata`` then finds them exactly as it finds a pip-installed package."""
from __future__ import annotations

import textwrap
from pathlib import Path


def distribution(root: Path, dist: str, entry: str, module: str, source: str | None,
                 version: str = "1.0") -> None:
    """Install (by path) distribution ``dist`` whose regfw entry point ``entry`` is ``module``; the
    module's ``source`` is written beside it unless None (a module made otherwise)."""
    if source is not None:
        (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[regfw]\n{entry} = {module}\n")
