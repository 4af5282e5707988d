"""The kill matrix: stop a real ``regfw fit`` process at every kind of moment, resume it, and get the
uninterrupted run: bitwise weights, the same ``metrics.csv`` rows, no temporary file left, and a
``--resume trainer.max_epochs=N+1`` that trains one more epoch.

Moments: a random training step (SIGKILL), the middle of a checkpoint write (SIGKILL), an epoch
boundary (after the last batch, before the epoch's checkpoint; SIGKILL), the moment the epoch's
checkpoint becomes visible (``epoch=000.ckpt``, and the epoch-end ``last.ckpt``: before Lightning
logs the epoch's training row; SIGKILL), after training during the final evaluation (SIGKILL),
mid-epoch SIGTERM (exit 143) and SIGINT (exit 130). A data module of
the test stalls on a chosen batch fetch and writes a marker file, so each signal arrives at a
known moment however loaded the machine is. Kept lean: an MLP on 10% of digits, 2 epochs of 3 steps.
"""
from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from regfw.cli.main import main
from regfw.run.checkpoints import read_checkpoint

STALL = '''
import os, time
from pathlib import Path
from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate
from regfw.build.datasets import DigitsDataModule

CALLS = {"train": 0, "val": 0}

def _collate(kind):
    def collate(batch):
        CALLS[kind] += 1
        if CALLS[kind] == int(os.environ.get(f"KM_STALL_{kind.upper()}", "0")):
            marker = Path(os.environ["KM_MARKER"])
            marker.write_text(kind)
            end = time.monotonic() + 120
            while marker.exists() and time.monotonic() < end:  # the test removes it once the signal is sent
                time.sleep(0.05)
        return default_collate(batch)
    return collate

class Stalling(DigitsDataModule):
    def train_dataloader(self):
        return DataLoader(self.train_dataset(), batch_size=self.batch_size, shuffle=True, collate_fn=_collate("train"))

    def val_dataloader(self):
        return DataLoader(self.val_dataset(), batch_size=self.batch_size, collate_fn=_collate("val"))
'''

# a kill in the middle of writing last.ckpt: the first write of its temporary file stalls half-way
SLOW_WRITE = '''
import os, sys, time
from pathlib import Path
import regfw.run.atomic as A

_open = A._open_temporary

class _Half:
    def __init__(self, f):
        self.f = f
    def write(self, data):
        n = self.f.write(bytes(data)[: max(len(data) // 2, 1)])
        self.f.flush()
        Path(os.environ["KM_MARKER"]).write_text("write")
        time.sleep(120)
        return n
    def __getattr__(self, name):
        return getattr(self.f, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return self.f.__exit__(*exc)

WRITES = [0]

def _slow(path, mode, **kw):
    f = _open(path, mode, **kw)
    if path.name.startswith(".last.ckpt") and "b" in mode:
        WRITES[0] += 1
        if WRITES[0] == 2:  # the second last.ckpt (step 4): the first one stays to resume from
            return _Half(f)
    return f

A._open_temporary = _slow
from regfw.cli.main import main
sys.exit(main(sys.argv[1:]))
'''

# a kill the moment a checkpoint file appears: the N-th rename onto KM_AFTER=NAME:N stalls after it
KILL_AFTER = '''
import os, sys, time
from pathlib import Path

_replace = os.replace
NAME, NTH = os.environ["KM_AFTER"].rsplit(":", 1)
SEEN = [0]

def _replace_then_stall(src, dst, *args, **kwargs):
    _replace(src, dst, *args, **kwargs)
    if Path(dst).name == NAME:
        SEEN[0] += 1
        if SEEN[0] == int(NTH):
            Path(os.environ["KM_MARKER"]).write_text("visible")
            time.sleep(120)

os.replace = _replace_then_stall
from regfw.cli.main import main
sys.exit(main(sys.argv[1:]))
'''

CONFIG = """
seed: 0
data: {class_path: km_data.Stalling, init_args: {batch_size: 48, train_fraction: 0.1}}
model: {name: mlp, init_args: {hidden: [16], in_features: 64, num_outputs: 10}}
optimizer: {name: adam, lr: 0.01}
regularizers: {dropout: {hidden: 0.3}}
uncertainty: {enabled: false}
trainer: {max_epochs: 2, deterministic: true, enable_progress_bar: false, enable_model_summary: false,
          log_every_n_steps: 1, num_sanity_val_steps: 0}
run: {checkpoint_every_n_steps: 2}
"""
STEPS_PER_EPOCH = 3  # 135 training examples in batches of 48
VAL_BATCHES = 10  # 450 validation examples in batches of 48


@pytest.fixture(scope="module")
def km(tmp_path_factory):
    """The directory with the config, the stalling data and the uninterrupted reference run."""
    root = tmp_path_factory.mktemp("km")
    (root / "km_data.py").write_text(STALL)
    (root / "slow_write.py").write_text(SLOW_WRITE)
    (root / "kill_after.py").write_text(KILL_AFTER)
    (root / "c.yaml").write_text(CONFIG)
    sys.path.insert(0, str(root))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["fit", "c.yaml", "--run-dir", "reference"]) == 0
    finally:
        os.chdir(cwd)
        sys.path.remove(str(root))
    return root


def _rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _weights(path: Path) -> dict:
    return read_checkpoint(path)["state_dict"]


# (name, how to start, environment, signal, expected exit status); every kill comes after the first
# checkpoint (step 2): a run killed before it has nothing to resume from (and --resume passes it over)
_rng = random.Random(14)
MATRIX = [
    ("random step", "-m regfw", {"KM_STALL_TRAIN": str(_rng.randint(4, 2 * STEPS_PER_EPOCH))}, signal.SIGKILL,
     -signal.SIGKILL),
    ("checkpoint write", "slow_write.py", {}, signal.SIGKILL, -signal.SIGKILL),
    ("epoch boundary", "-m regfw", {"KM_STALL_VAL": "1"}, signal.SIGKILL, -signal.SIGKILL),
    # the epoch's checkpoints are written at its validation's end; Lightning logs the epoch's training row
    # (train_loss, train_acc) after them: the row travels in the checkpoint and the resume writes it
    ("epoch checkpoint visible", "kill_after.py", {"KM_AFTER": "epoch=000.ckpt:1"}, signal.SIGKILL,
     -signal.SIGKILL),
    ("epoch last.ckpt visible", "kill_after.py", {"KM_AFTER": "last.ckpt:2"}, signal.SIGKILL, -signal.SIGKILL),
    ("after training", "-m regfw", {"KM_STALL_VAL": str(2 * VAL_BATCHES + 1)}, signal.SIGKILL, -signal.SIGKILL),
    ("sigterm", "-m regfw", {"KM_STALL_TRAIN": "5"}, signal.SIGTERM, 143),
    ("sigint", "-m regfw", {"KM_STALL_TRAIN": "5"}, signal.SIGINT, 130),
]


@pytest.mark.parametrize("name, start, env, sig, status", MATRIX, ids=[m[0] for m in MATRIX])
def test_kill_and_resume_gives_the_uninterrupted_run(km, monkeypatch, capsys, name, start, env, sig, status):
    run = f"run-{name.replace(' ', '-')}"
    marker = km / f"{run}.marker"
    full_env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(km),
                "KM_MARKER": str(marker), **env}
    full_env.pop("REGFW_RUN_DIR", None)
    proc = subprocess.Popen([sys.executable, *start.split(), "fit", "c.yaml", "--run-dir", run], cwd=km,
                            env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 240
    while not marker.exists():
        assert proc.poll() is None, f"ended before the stall ({proc.returncode}): {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < end, "never reached the stall"
        time.sleep(0.05)
    proc.send_signal(sig)
    marker.unlink()  # a SIGTERM only sets Lightning's flag: the stalled batch goes on, and training stops after it
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == status, err[-2000:]
    if sig == signal.SIGTERM:
        assert "regfw fit: error: stopped by SIGTERM at global step 5 (epoch 1); saved" in err
    if sig == signal.SIGINT:
        assert "regfw fit: error: interrupted (SIGINT) at global step" in err and "Continue with" in err

    monkeypatch.chdir(km)
    monkeypatch.syspath_prepend(str(km))
    reference = km / "reference"
    last = km / run / "checkpoints" / "last.ckpt"
    if name != "after training":
        assert main(["fit", "c.yaml", "--run-dir", run, "--resume"]) == 0
    else:  # training had finished: there is nothing to resume, and the message says so
        assert main(["fit", "c.yaml", "--run-dir", run, "--resume"]) == 2
        assert "there is nothing left to train" in capsys.readouterr().err
    weights, ref = _weights(last), _weights(reference / "checkpoints" / "last.ckpt")
    assert weights.keys() == ref.keys() and all(torch.equal(weights[k], ref[k]) for k in ref)  # bitwise
    assert _rows(km / run) == _rows(reference)  # every row, every value
    assert (km / run / "metrics.csv").read_bytes() == (reference / "metrics.csv").read_bytes()  # the identical file
    leftovers = [p.name for p in (km / run).rglob("*") if ".tmp-" in p.name]
    assert not leftovers  # a kill mid-write leaves .last.ckpt.tmp-PID; the resume removed it

    assert main(["fit", "c.yaml", "--run-dir", run, "--resume", "trainer.max_epochs=3"]) == 0
    more = read_checkpoint(last)
    assert more["global_step"] == 3 * STEPS_PER_EPOCH and more["epoch"] == 2
    assert [r["epoch"] for r in _rows(km / run) if r.get("val_loss")] == ["0", "1", "2"]
