"""Start-up: ``regfw plan``, ``regfw plugins``, ``regfw init`` and config errors import nothing heavy.

Each command runs in a fresh interpreter; afterwards ``sys.modules`` must hold none of the heavy
packages the command does not use (Lightning alone costs seconds). Times are measured in
``bench/startup.py``, not asserted here.
"""
from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
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


@pytest.mark.parametrize("args", [("plugins",), ("plan", "templates/demo.yaml", "trainer.max_epoch=3")],
                         ids=["plugins", "config-error"])
def test_plugins_and_config_errors_import_no_lightning(args):
    result, out = run_cli(*args)
    if args[0] == "plan":
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
