"""The registry sweep runs real torchvision and timm models: without them it FAILS (never skips), so a broken
zoo environment cannot pass silently. Run it in the zoo environment: `make test-sweep`."""
from __future__ import annotations

import importlib
from typing import Any

import pytest

_MISSING = []
for _name in ("torchvision", "timm"):
    try:
        importlib.import_module(_name)
    except Exception as exc:  # noqa: BLE001 - an import that fails in any way means a broken zoo env
        _MISSING.append(f"{_name} ({type(exc).__name__}: {exc})")

if _MISSING:
    raise pytest.UsageError(
        f"tests/sweep needs torchvision and timm, but these do not import: {'; '.join(_MISSING)}. "
        f"Run the sweep in the zoo environment: make test-sweep (built from constraints-zoo.txt)"
    )


# --------------------------------------------------------------------------- the table

_OUTCOMES: dict[str, dict[str, str]] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "test_sweep[" not in report.nodeid or (report.when != "call" and report.outcome != "failed"):
        return
    cid = report.nodeid.split("@", 1)[0].split("[", 1)[1].rstrip("]")  # --dist loadgroup appends @<group>
    key, variant = cid.rsplit("-", 1)
    outcome = "xfail" if hasattr(report, "wasxfail") and report.outcome == "skipped" else report.outcome
    _OUTCOMES.setdefault(key, {})[variant] = outcome


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _OUTCOMES:
        return
    from .test_sweep import EXCLUDED, KNOWN_FAILURES

    write = terminalreporter.write_line
    families = {k for k in _OUTCOMES if k.startswith("timm/")}
    builders = {k for k in _OUTCOMES if k.startswith("torchvision/")}
    passed = {k for k, v in _OUTCOMES.items() if all(o == "passed" for o in v.values())}
    write("")
    write("registry sweep: " + ", ".join([
        f"timm families tried {len(families)}, passed {len(families & passed)}",
        f"torchvision builders tried {len(builders)}, passed {len(builders & passed)}",
        f"excluded {len(EXCLUDED)}"]))
    classes: dict[str, list[str]] = {}
    for cid, found in KNOWN_FAILURES.items():
        for cls in found:
            classes.setdefault(cls, []).append(cid)
    for cls, cases in sorted(classes.items()):
        write(f"  known failure {cls}: {len(cases)} case(s), e.g. {', '.join(sorted(cases)[:4])}")
    failed = sorted(f"{k}-{v}" for k, vs in _OUTCOMES.items() for v, o in vs.items() if o == "failed")
    if failed:
        write(f"  failed {len(failed)}: {', '.join(failed[:10])}")
    for key, why in sorted(EXCLUDED.items()):
        write(f"  excluded {key}: {why[:160]}")
