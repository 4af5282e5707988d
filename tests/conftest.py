"""Shared fixtures. Tests use real torch, Lightning and pluggy objects throughout."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# `make test` runs two workers on two cores: one torch thread each avoids oversubscription,
# which slows small-model tests several-fold. Subprocesses get the same through OMP_NUM_THREADS.
torch.set_num_threads(1)


@pytest.fixture
def run_cli(tmp_path):
    """Run ``python -m regfw ARGS`` in a subprocess inside ``tmp_path``; returns the result."""

    def run(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        return subprocess.run([sys.executable, "-m", "regfw", *args], cwd=tmp_path, env=full_env,
                              capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture
def fresh_plugins():
    """Rediscover plugins before and after the test (for tests that change what is installed)."""
    from regfw.registry.discovery import reset_plugin_manager

    reset_plugin_manager()
    yield
    reset_plugin_manager()


ZOO = ROOT / "tests" / "zoo"
INSTALLED = ROOT / "tests" / "installed"
#: Folders that need an environment of their own, run by their own `make` stage.
SEPARATE = (ZOO, INSTALLED)


def pytest_ignore_collect(collection_path, config):
    """The zoo (tests/zoo/) needs torchvision and timm, which only the zoo environment (.venv-zoo,
    `make test` builds it) has; tests/installed/ checks the wheel installed into a fresh environment
    (.venv-wheel, `make test-wheel`). A plain run of the suite leaves both out, and each runs when named
    (`pytest tests/zoo`), where it fails loudly if its environment is missing."""
    if collection_path not in SEPARATE:
        return None
    named = any(Path(str(a).split("::")[0]).resolve().is_relative_to(collection_path) for a in config.args)
    return None if named else True
