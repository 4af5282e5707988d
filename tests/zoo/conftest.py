"""The zoo runs real torchvision, timm and transformers models: without them it FAILS (never skips), so a broken
zoo environment cannot pass silently. Run it in the zoo environment: `make test-zoo`."""
from __future__ import annotations

import importlib

import pytest

_MISSING = []
for _name in ("torchvision", "timm", "transformers"):
    try:
        importlib.import_module(_name)
    except Exception as exc:  # noqa: BLE001 - an import that fails in any way means a broken zoo env
        _MISSING.append(f"{_name} ({type(exc).__name__}: {exc})")

if _MISSING:
    raise pytest.UsageError(
        f"tests/zoo needs torchvision, timm and transformers, but these do not import: {'; '.join(_MISSING)}. "
        f"Run the zoo in its own environment: make test-zoo (built from constraints-zoo.txt)"
    )
