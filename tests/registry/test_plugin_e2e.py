"""The plugin author's path, end to end: generate, install, list, plan, train, test, uninstall.

The generated package is installed into this test environment with pip exactly as an author
installs it, and every check runs the ``regfw`` command in a fresh process (the plugin manager
of this process has already discovered its plugins and would not see the new one). The name is
unique per run, so parallel runs never collide, and the package is uninstalled at the end.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from importlib import metadata
from pathlib import Path

import pytest

from regfw.cli.new_plugin import distribution_name, new_plugin, package_name

PREFIX = "e2e_"
#: Leftovers of a run that was killed before its uninstall are removed after this long.
STALE_AFTER_S = 30 * 60


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=300)


def _remove_stale_installs() -> None:
    """Uninstall e2e plugins that a killed run left behind (never one a running test just made)."""
    stale = []
    for dist in metadata.distributions():
        name = dist.metadata["Name"] or ""
        if not name.startswith(distribution_name(PREFIX)):
            continue
        files = dist.files or []
        record = next((f for f in files if f.name == "RECORD"), None)
        path = Path(record.locate()) if record is not None else None
        if path is not None and path.exists() and time.time() - path.stat().st_mtime > STALE_AFTER_S:
            stale.append(name)
    if stale:
        _pip("uninstall", "-y", *stale)


class _Started:
    """A subprocess started now and awaited later, so that independent checks overlap."""

    def __init__(self, command: list[str], cwd: Path) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("REGFW_LOAD_PLUGINS", None)
        env.pop("REGFW_TRACE_PLUGINS", None)
        self.command = command
        self.proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)

    def result(self, timeout: float = 300) -> subprocess.CompletedProcess:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        return subprocess.CompletedProcess(self.command, self.proc.returncode, out, err)


def _regfw(*args: str, cwd: Path) -> _Started:
    """``regfw ARGS`` through the installed console script, as an author types it."""
    script = shutil.which("regfw", path=str(Path(sys.executable).parent))
    return _Started([*([script] if script else [sys.executable, "-m", "regfw"]), *args], cwd)


@pytest.mark.slow
@pytest.mark.serial
def test_a_generated_plugin_installs_lists_plans_trains_and_passes_its_own_tests(tmp_path):
    _remove_stale_installs()
    name = f"{PREFIX}{uuid.uuid4().hex[:8]}"
    dist, package = distribution_name(name), package_name(name)
    made = new_plugin(name, tmp_path)
    example = made.path / "example.yaml"
    installed = False
    started: dict[str, _Started] = {}
    try:
        proc = _pip("install", "-q", "--no-deps", "--no-build-isolation", str(made.path))
        assert proc.returncode == 0, proc.stderr
        installed = True
        assert metadata.version(dist) == "0.1.0"

        # the four checks are independent: run them side by side, then look at each
        started.update({
            "plugins": _regfw("plugins", "--check", cwd=tmp_path),
            "plan": _regfw("plan", str(example), cwd=tmp_path),
            "fit": _regfw("fit", str(example), "trainer.max_epochs=1", "data.train_fraction=0.2",
                          "uncertainty.enabled=false", "trainer.enable_progress_bar=false",
                          "trainer.enable_model_summary=false", f"run.dir={tmp_path / 'runs'}", cwd=tmp_path),
            "tests": _Started([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                               str(made.path / "tests")], tmp_path),
        })
        done = {key: job.result() for key, job in started.items()}

        # 1. regfw lists it, with its version, distribution, module and regularizer
        proc = done["plugins"]
        assert proc.returncode == 0, proc.stderr
        assert f"{name} 0.1.0 ({dist}; module {package})" in proc.stdout
        listing = proc.stdout.split(f"{name} 0.1.0", 1)[1]
        assert f"regularizers: {name}" in listing and "multiplicative uniform noise" in listing
        assert "[regfw trace]" not in proc.stderr  # tracing is off unless asked for

        # 2. `regfw plan` on a config selecting it shows its layers, with the configured rate
        proc = done["plan"]
        assert proc.returncode == 0, proc.stderr
        rows = [line.split() for line in proc.stdout.splitlines() if line.startswith(name + " ")]
        assert rows, proc.stdout
        assert all(row[2] == "hidden" and row[3] == "uniform_noise" and row[4] == "0.2" for row in rows), rows

        # 3. a short `regfw fit` trains with it; the run's plan holds the same rows
        proc = done["fit"]
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert re.search(r"^  val_acc +\d\.\d{4}$", proc.stdout, flags=re.M), proc.stdout
        run_dir = Path(re.search(r"^run directory: (.+)$", proc.stdout, flags=re.M).group(1))
        plan_rows = [line.split() for line in (run_dir / "plan.txt").read_text().splitlines()
                     if line.startswith(name + " ")]
        assert plan_rows == rows
        assert (run_dir / "checkpoints" / "last.ckpt").is_file()

        # 4. the generated package's own tests pass against the installed package
        proc = done["tests"]
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
        assert re.search(r"\b\d+ passed\b", proc.stdout) and "skipped" not in proc.stdout
    finally:
        for job in started.values():
            if job.proc.poll() is None:
                job.proc.kill()
                job.proc.wait()
        if installed:
            uninstall = _pip("uninstall", "-y", dist)
    assert uninstall.returncode == 0, uninstall.stderr
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.version(dist)
