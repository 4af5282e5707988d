"""SIGTERM and SIGINT at the moments of ``regfw fit`` outside Lightning's training loop: the start-up
(before anything is written; after the run directory was claimed, before Lightning installs its own
handler) and after training (the final evaluation, Lightning's teardown). Each ends with exit 143
(SIGTERM) or 130 (SIGINT) and one line that says what state the run is in; a start that had no
checkpoint of its own leaves nothing, a finished or resumed run stays as it was, and ``--resume``
then works. The mid-training kills are the kill matrix's (``tests/run/test_kill_matrix.py``).

Each moment is reached deterministically by a real data module of the test: at a named hook (its
``__init__``, ``setup``, ``teardown``, a batch's collation or transfer) it either writes a marker
and stalls, for a signal sent by the test to a real ``regfw fit`` process, or signals its own
process, for the in-process cases through the CLI's ``main()`` (SIGTERM only: a SIGINT there would
be the test runner's). Kept lean: an MLP on 10% of digits, 1 epoch of 4 steps.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from regfw.cli.main import main
from regfw.run.checkpoints import read_checkpoint

DATA = '''
import os, signal, time
from pathlib import Path
from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate
from regfw.build.datasets import DigitsDataModule

CALLS = {"train": 0, "val": 0, "transfer": 0}

def at(where):
    """SIG_STALL=where: write the marker and stall; SIG_SELF=where: SIGTERM to this thread."""
    if os.environ.get("SIG_STALL") == where:
        Path(os.environ["SIG_MARKER"]).write_text(where)
        time.sleep(120)
    if os.environ.get("SIG_SELF") == where:
        signal.raise_signal(signal.SIGTERM)  # its handler runs before this returns

def _collate(kind):
    def collate(batch):
        CALLS[kind] += 1
        at(f"{kind}{CALLS[kind]}")
        return default_collate(batch)
    return collate

class Stalling(DigitsDataModule):
    def __init__(self, **kw):
        at("init")
        super().__init__(**kw)

    def setup(self, stage):
        at("setup-" + str(getattr(stage, "value", stage)))

    def teardown(self, stage):
        at("teardown-" + str(getattr(stage, "value", stage)))

    def on_after_batch_transfer(self, batch, dataloader_idx):
        CALLS["transfer"] += 1
        at(f"transfer{CALLS['transfer']}")
        return batch

    def train_dataloader(self):
        return DataLoader(self.train_dataset(), batch_size=self.batch_size, shuffle=True,
                          collate_fn=_collate("train"))

    def val_dataloader(self):
        return DataLoader(self.val_dataset(), batch_size=self.batch_size, collate_fn=_collate("val"))
'''

CONFIG = """
seed: 0
data: {class_path: sig_data.Stalling, init_args: {batch_size: 48, train_fraction: 0.1, val_fraction: 0.1}}
model: {name: mlp, init_args: {hidden: [16], in_features: 64, num_outputs: 10}}
optimizer: {name: adam, lr: 0.01}
regularizers: {dropout: {hidden: 0.3}}
uncertainty: {enabled: false}
trainer: {max_epochs: 1, deterministic: true, enable_progress_bar: false, enable_model_summary: false,
          log_every_n_steps: 1, num_sanity_val_steps: 0}
"""
STEPS = 4  # 162 training examples in batches of 48
VAL_BATCHES = 4  # 180 validation examples in batches of 48
FINAL_EVALUATION = f"val{VAL_BATCHES + 1}"  # the first batch after the epoch's validation


@pytest.fixture
def root(tmp_path, monkeypatch):
    (tmp_path / "sig_data.py").write_text(DATA)
    (tmp_path / "c.yaml").write_text(CONFIG)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("sig_data", None)  # a fresh call count for each test
    for name in ("SIG_STALL", "SIG_SELF", "REGFW_RUN_DIR"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def _line(err: str, expected: str) -> None:
    """``expected`` is the last line on stderr, the only one from regfw, and no traceback came."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1] == expected, err[-3000:]
    assert sum(line.startswith("regfw") for line in lines) == 1 and "Traceback" not in err, err[-3000:]


def _no_temporaries(root: Path) -> None:
    assert not [p for p in root.rglob("*") if ".tmp-" in p.name]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _resumes_one_more_epoch(run: str) -> None:
    assert main(["fit", "c.yaml", "--run-dir", run, "--resume", "trainer.max_epochs=2"]) == 0
    ckpt = read_checkpoint(Path(run) / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2 * STEPS and ckpt["epoch"] == 1


# -- real processes: a signal sent from outside ----------------------------------------------------

WHAT = {signal.SIGTERM: ("stopped by SIGTERM", 143), signal.SIGINT: ("interrupted (SIGINT)", 130)}
CASES = [(moment, sig) for moment in ("setup-fit", FINAL_EVALUATION) for sig in (signal.SIGTERM, signal.SIGINT)]


@pytest.mark.slow
def test_a_signal_during_start_up_or_after_training_is_one_line_with_the_state_of_the_run(root, capsys):
    """The four (moment, signal) cases as four ``python -m regfw fit`` processes, run side by side."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}  # four side by side: one thread each
    procs = {}
    for moment, sig in CASES:
        run = f"run-{moment}-{sig.name}"
        procs[(moment, sig)] = (run, subprocess.Popen(
            [sys.executable, "-m", "regfw", "fit", "c.yaml", "--run-dir", run], cwd=root,
            env={**env, "SIG_STALL": moment, "SIG_MARKER": str(root / f"{run}.marker")},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    end = time.monotonic() + 300
    waiting = dict(procs)
    while waiting:  # each process gets its signal as soon as it stalls at its moment
        for key, (run, proc) in list(waiting.items()):
            assert proc.poll() is None, f"{run} ended before its stall: {proc.stderr.read()[-2000:]}"
            if (root / f"{run}.marker").exists():
                proc.send_signal(key[1])
                del waiting[key]
        assert time.monotonic() < end, f"never reached: {sorted(r for r, _ in waiting.values())}"
        time.sleep(0.05)

    for (moment, sig), (run, proc) in procs.items():
        out, err = proc.communicate(timeout=120)
        what, status = WHAT[sig]
        assert proc.returncode == status, (run, err[-2000:])
        assert "run directory:" not in out  # no report of a finished run
        if moment == "setup-fit":  # the run directory was made, Lightning's own handler not yet installed
            _line(err, f"regfw fit: error: {what} during start-up, before the first training step; the new run "
                       f"directory {run} was removed, so there is nothing to resume.")
            assert not (root / run).exists()
        else:
            last = root / run / "checkpoints" / "last.ckpt"
            _line(err, f"regfw fit: error: {what} after training finished, during the final evaluation; the run is "
                       f"complete: checkpoint {last} (global step {STEPS}) holds the trained weights (to train "
                       f"further: `regfw fit c.yaml --run-dir {run} --resume trainer.max_epochs=2`).")
            assert read_checkpoint(last)["global_step"] == STEPS
            _resumes_one_more_epoch(run)
    _no_temporaries(root)
    assert sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("run-")) == \
        [f"run-{FINAL_EVALUATION}-SIGINT", f"run-{FINAL_EVALUATION}-SIGTERM"]


# -- in this process, through main(): the data module signals itself --------------------------------


def test_sigterm_before_anything_is_written_leaves_nothing(root, capsys, monkeypatch):
    monkeypatch.setenv("SIG_SELF", "init")
    assert main(["fit", "c.yaml", "--run-dir", "run"]) == 143
    _line(capsys.readouterr().err, "regfw fit: error: stopped by SIGTERM during start-up, before anything was "
                                   "written; there is nothing to resume.")
    assert not (root / "run").exists() and not (root / "runs").exists()


def test_sigterm_in_a_given_empty_directory_leaves_it_empty(root, capsys, monkeypatch):
    (root / "mine").mkdir()  # the user's own (empty) directory: emptied again, not removed
    monkeypatch.setenv("SIG_SELF", "setup-fit")
    assert main(["fit", "c.yaml", "--run-dir", "mine"]) == 143
    _line(capsys.readouterr().err, "regfw fit: error: stopped by SIGTERM during start-up, before the first training "
                                   "step; what it had written in mine was removed, so there is nothing to resume.")
    assert (root / "mine").is_dir() and not list((root / "mine").iterdir())


def test_sigterm_while_a_resume_starts_leaves_the_run_as_it_was_and_resume_then_works(root, capsys, monkeypatch):
    assert main(["fit", "c.yaml", "--run-dir", "run"]) == 0
    last = Path("run") / "checkpoints" / "last.ckpt"  # as --resume found it
    before = {p.name: _digest(p) for p in (root / "run").rglob("*") if p.is_file() and p.name != ".regfw-lock"}
    capsys.readouterr()
    monkeypatch.setenv("SIG_SELF", "setup-fit")
    assert main(["fit", "c.yaml", "--run-dir", "run", "--resume", "trainer.max_epochs=2"]) == 143
    _line(capsys.readouterr().err, f"regfw fit: error: stopped by SIGTERM during start-up, before the first training "
                                   f"step; the run is as it was: checkpoint {last} (global step {STEPS}) is "
                                   f"complete. Continue with `regfw fit c.yaml --run-dir run --resume`.")
    after = {p.name: _digest(p) for p in (root / "run").rglob("*") if p.is_file() and p.name != ".regfw-lock"}
    assert after == before  # no resume-1.yaml, no file touched
    monkeypatch.delenv("SIG_SELF")
    _resumes_one_more_epoch("run")
    _no_temporaries(root)


@pytest.mark.parametrize("moment, during", [
    (f"transfer{STEPS + VAL_BATCHES}", ""),  # the last validation batch: Lightning's handler, then its stop
    ("teardown-fit", ", as Lightning finished"),  # after Lightning's teardown: regfw's handler again
    (FINAL_EVALUATION, ", during the final evaluation"),
])
def test_sigterm_once_training_is_done_says_the_run_is_complete(root, capsys, monkeypatch, moment, during):
    monkeypatch.setenv("SIG_SELF", moment)
    assert main(["fit", "c.yaml", "--run-dir", "run"]) == 143
    last = (root / "run" / "checkpoints" / "last.ckpt").resolve()
    _line(capsys.readouterr().err, f"regfw fit: error: stopped by SIGTERM after training finished{during}; the run is "
                                   f"complete: checkpoint {last} (global step {STEPS}) holds the trained weights (to "
                                   f"train further: `regfw fit c.yaml --run-dir run --resume trainer.max_epochs=2`).")
    monkeypatch.delenv("SIG_SELF")
    _resumes_one_more_epoch("run")
    _no_temporaries(root)


def test_sigterm_during_validation_waits_for_its_checkpoint_and_resume_is_exact(root, capsys, monkeypatch):
    """Lightning would stop after the validation batch, before the epoch's checkpoint (the epoch's
    training steps lost, and with them, in a first epoch, the run directory)."""
    import csv

    assert main(["fit", "c.yaml", "--run-dir", "reference", "trainer.max_epochs=2"]) == 0
    capsys.readouterr()
    sys.modules["sig_data"].CALLS.update(train=0, val=0, transfer=0)
    monkeypatch.setenv("SIG_SELF", "val2")  # the first epoch's validation, half-way
    assert main(["fit", "c.yaml", "--run-dir", "run", "trainer.max_epochs=2"]) == 143
    last = (root / "run" / "checkpoints" / "last.ckpt").resolve()
    _line(capsys.readouterr().err, f"regfw fit: error: stopped by SIGTERM at global step {STEPS} (epoch 1); saved "
                                   f"{last} at global step {STEPS}. Continue with `regfw fit c.yaml --run-dir run "
                                   f"--resume`.")
    monkeypatch.delenv("SIG_SELF")
    assert main(["fit", "c.yaml", "--run-dir", "run", "--resume", "trainer.max_epochs=2"]) == 0
    weights = read_checkpoint(last)["state_dict"]
    ref = read_checkpoint(root / "reference" / "checkpoints" / "last.ckpt")["state_dict"]
    assert weights.keys() == ref.keys() and all(torch.equal(weights[k], ref[k]) for k in ref)  # bitwise

    def rows(run: str) -> list[dict]:
        with open(root / run / "metrics.csv", newline="") as f:
            return list(csv.DictReader(f))

    assert rows("run") == rows("reference")
    _no_temporaries(root)


def test_the_other_commands_stop_on_sigterm_with_one_line_and_put_the_previous_handlers_back(root, capsys,
                                                                                             monkeypatch):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    monkeypatch.setenv("SIG_SELF", "init")
    assert main(["plan", "c.yaml"]) == 143
    _line(capsys.readouterr().err, "regfw plan: stopped by SIGTERM")
    assert {s: signal.getsignal(s) for s in before} == before
    monkeypatch.delenv("SIG_SELF")
    assert main(["plan", "c.yaml"]) == 0
    assert {s: signal.getsignal(s) for s in before} == before
