"""Start-up: ``regfw --help`` and ``regfw plugins`` answer from entry-point metadata without
importing torch, in at most 0.3 s of CPU; ``regfw plan``, ``regfw init`` and config errors import
nothing heavy they do not use.

Each command runs in a fresh interpreter; afterwards ``sys.modules`` must hold none of the heavy
packages the command does not use (torch costs about 1.5 s of CPU, Lightning seconds more).
``regfw plan`` next to ``import torch`` is measured by ``bench/startup.py``, not asserted here.
"""
from __future__ import annotations

import inspect
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("pytorch_lightning", "lightning", "lightning_fabric", "torchmetrics", "sklearn", "matplotlib")

PROBE = """
import json, sys
from regfw.cli.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = [m for m in {heavy!r} if m in sys.modules]
print("\\nRESULT " + json.dumps({{"code": code, "heavy": heavy}}))
"""


def run_cli(*args: str, cwd: Path = ROOT, heavy: tuple[str, ...] = HEAVY) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(heavy=heavy), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]), proc.stdout + proc.stderr


def test_plan_on_the_demo_config_imports_no_lightning():
    result, out = run_cli("plan", str(ROOT / "templates" / "demo.yaml"))
    assert result["code"] in (0, None), out
    assert "dropout" in out and "body.0" in out  # the plan itself was printed
    assert result["heavy"] == [], out


def test_plugins_lists_every_entry_point_without_importing_torch():
    from importlib import metadata

    result, out = run_cli("plugins", heavy=("torch", *HEAVY))
    assert result["code"] == 0 and result["heavy"] == [], out
    for ep in metadata.entry_points(group="regfw"):  # each with its module, as its metadata declares
        assert f"{ep.name} " in out and f"module {ep.value})" in out, (ep, out)
    assert "`regfw plugins --check` imports them" in out


@pytest.mark.parametrize("args", [("--help",), ("fit", "--help"), ("plugins", "--help")], ids=lambda a: " ".join(a))
def test_help_imports_nothing_heavy(args):
    result, out = run_cli(*args, heavy=("torch", "omegaconf", "numpy", *HEAVY))
    assert result["code"] == 0 and "usage: regfw" in out, out
    assert result["heavy"] == [], out


def _cpu_seconds(*args: str) -> float:
    """User + system CPU seconds of one ``python -m regfw ARGS`` run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-m", "regfw", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONDONTWRITEBYTECODE": ""})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert proc.returncode == 0, proc.stderr
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


@pytest.mark.parametrize("args", [("--help",), ("plugins",)], ids=lambda a: " ".join(a))
def test_help_and_plugins_answer_in_at_most_0_3_s_of_cpu(args):
    """CPU time, not wall time: a loaded machine stretches the second, not the first. ``import torch``
    alone costs about 1.5 s, so a command that imported it could not pass."""
    _cpu_seconds(*args)  # bytecode caches
    median = statistics.median(_cpu_seconds(*args) for _ in range(3))
    assert median <= 0.3, median


def test_config_errors_import_no_lightning():
    result, out = run_cli("plan", "templates/demo.yaml", "trainer.max_epoch=3")
    assert result["code"] == 2 and "trainer.max_epoch" in out, out
    assert result["heavy"] == [], out


def test_init_imports_no_lightning(tmp_path):
    result, out = run_cli("init", str(tmp_path / "new.yaml"))
    assert result["code"] in (0, None) and (tmp_path / "new.yaml").is_file(), out
    assert result["heavy"] == [], out


def test_trainer_argument_list_matches_lightning():
    """The names the config checks the trainer section against are Lightning's own."""
    from pytorch_lightning import Trainer

    from regfw.config.trainer_args import TRAINER_ARGUMENTS

    assert list(TRAINER_ARGUMENTS) == [p for p in inspect.signature(Trainer.__init__).parameters if p != "self"]


@pytest.mark.parametrize(("args", "expected"), [
    (("plan", "missing.yaml"), "config file 'missing.yaml' does not exist"),
    (("plan", "bad.yaml"), "is not valid YAML at line 3"),
    (("plan", "templates/demo.yaml", "optimiser.lr=0.1"), "optimiser: unknown top-level section"),
    (("plan", "templates/demo.yaml", "trainer.max_epochs=-1"), "trainer.max_epochs: got -1"),
    (("plan", "templates/demo.yaml", "uncertainty.samples=1"), "uncertainty.samples: got 1"),
    (("plan", "templates/demo.yaml", "run.on_nan=explode"), "run.on_nan: got 'explode'"),
    (("fit", "templates/demo.yaml", "uncertainty.strategy=fast"), "uncertainty.strategy: got 'fast'"),
], ids=["missing-file", "yaml", "top-level", "trainer", "uncertainty", "run", "fit"])
def test_config_errors_found_without_torch_come_before_it_is_imported(args, expected, tmp_path):
    """Errors outside the regularizers section (whose settings classes live in the plugins, which
    import torch) are reported by plan and fit before torch is imported: in about 0.2 s, not 3."""
    (tmp_path / "bad.yaml").write_text("seed: 0\ndata: {name: digits\n")
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "demo.yaml").write_text((ROOT / "templates" / "demo.yaml").read_text())
    result, out = run_cli(*args, cwd=tmp_path, heavy=("torch", *HEAVY))
    assert result["code"] == 2 and expected in out, out
    assert result["heavy"] == [], out
