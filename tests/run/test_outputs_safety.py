"""What regfw writes at a path a user gives, what it predicts for rows it cannot score, and SIGINT in
every command.

* Only a regular file is ever replaced (``regfw.run.atomic``): a FIFO, a socket, a directory, a
  symbolic link (dangling too) and a character device are refused, also with ``--force``, and
  stay exactly what they were. The targets are made in the test's directory; the device node
  with ``os.mknod`` (root only; the real system nodes are never a target).
* An existing regular file is replaced only with ``--force``, also when it appears while
  regfw writes.
* A full disk while ``predict --out`` writes is one line and leaves nothing (simulated at the
  write layer, ``regfw.run.atomic._open_temporary``, as the other full-disk tests do).
* A row whose inputs are finite but whose model output is not is referred for review with its
  reason (``predict``) or listed as referred instead of ranked (``rank``).
* SIGINT mid-work exits 130 with one line and nothing half-written: real ``regfw`` processes for
  ``predict``, ``rank``, ``plan`` and ``demo`` (a data module of the test stalls at a named
  moment); in this process, through ``main()``, for ``init``, ``new-plugin`` and ``plugins``
  (the signal is raised from inside the step that writes or lists).
"""
from __future__ import annotations

import csv
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import regfw.run.atomic as A
from regfw.cli.main import main
from regfw.cli.predict import NONFINITE_OUTPUT, prediction_rows
from regfw.errors import OutputError

CONFIG = """\
seed: 0
data: {class_path: out_data.Digits, init_args: {batch_size: 64, train_fraction: 0.1}}
model: {name: mlp, init_args: {hidden: [16], in_features: 64, num_outputs: 10}}
regularizers: {dropout: {hidden: 0.3}}
uncertainty: {samples: 3, plots: false}
trainer: {max_epochs: 1, enable_progress_bar: false, enable_model_summary: false}
"""

DATA = '''
import os, time
from pathlib import Path
from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate
from regfw.build.datasets import BUILTIN_DATA

CALLS = {"val": 0}

def at(where):
    """OUT_STALL=where: write the marker OUT_MARKER and stall (for a signal from the test)."""
    if os.environ.get("OUT_STALL") == where:
        Path(os.environ["OUT_MARKER"]).write_text(where)
        time.sleep(120)

def collate(batch):
    CALLS["val"] += 1
    at(f"val{CALLS['val']}")
    return default_collate(batch)

class Digits(BUILTIN_DATA["digits"]):
    """Digits; OUT_HUGE_ROW=i puts 3e38 (finite) in every feature of validation row i."""

    def __init__(self, **kw):
        at("init")
        super().__init__(**kw)
        if os.environ.get("OUT_HUGE_ROW"):
            self.x_val[int(os.environ["OUT_HUGE_ROW"])] = 3e38

    def val_dataloader(self):
        return DataLoader(self.val_dataset(), batch_size=256, shuffle=False, collate_fn=collate)
'''


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-epoch run of :data:`CONFIG`: ``(directory, checkpoint)``."""
    root = tmp_path_factory.mktemp("outputs")
    (root / "out_data.py").write_text(DATA)
    (root / "c.yaml").write_text(CONFIG)
    cwd = os.getcwd()
    sys.path.insert(0, str(root))
    os.chdir(root)
    try:
        assert main(["fit", "c.yaml", "--run-dir", "run"]) == 0
    finally:
        os.chdir(cwd)
        sys.path.remove(str(root))
    return root, root / "run" / "checkpoints" / "last.ckpt"


@pytest.fixture
def here(trained, tmp_path, monkeypatch):
    """This test's directory, with the run's config and data module, as the working directory."""
    root, ckpt = trained
    (tmp_path / "out_data.py").write_text(DATA)
    (tmp_path / "c.yaml").write_text(CONFIG)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("out_data", None)
    for name in ("OUT_STALL", "OUT_HUGE_ROW"):
        monkeypatch.delenv(name, raising=False)
    yield tmp_path, ckpt
    sys.modules.pop("out_data", None)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("regfw")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def _no_temporaries(directory: Path) -> None:
    assert not [p.name for p in directory.rglob("*") if ".tmp-" in p.name]


# -- targets that are not regular files ---------------------------------------------------------------


def _make(kind: str, path: Path) -> None:
    """A ``kind`` node at ``path``, in the test's directory."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        (path.parent / "mine.txt").write_text("mine\n")
        os.symlink(path.parent / "mine.txt", path)
    elif kind == "dangling":
        os.symlink(path.parent / "nowhere.txt", path)
    elif kind == "directory":
        path.mkdir()
        (path / "inside.txt").write_text("mine\n")
    elif kind == "socket":
        if len(os.fsencode(path)) > 100:  # AF_UNIX paths are limited to about 108 bytes
            pytest.skip(f"a socket path in this temporary directory would be {len(os.fsencode(path))} bytes")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        sock.close()
    elif kind == "chardev":
        if os.geteuid() != 0:
            pytest.skip("making a character device node (os.mknod) needs root")
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # a node of our own, in the test's directory


NODES = {"fifo": ("FIFO (named pipe)", stat.S_ISFIFO), "symlink": ("symbolic link", stat.S_ISLNK),
         "dangling": ("symbolic link", stat.S_ISLNK), "directory": ("directory", stat.S_ISDIR),
         "socket": ("socket", stat.S_ISSOCK), "chardev": ("character device", stat.S_ISCHR)}


def _state(path: Path) -> tuple:
    st = os.lstat(path)
    link = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
    return st.st_mode, st.st_ino, st.st_rdev, link, sorted(p.name for p in path.iterdir()) if path.is_dir() and \
        link is None else None


@pytest.mark.parametrize("kind", list(NODES))
def test_the_atomic_write_never_replaces_anything_but_a_regular_file(kind, tmp_path):
    target = tmp_path / "target"
    _make(kind, target)
    before = _state(target)
    name, is_kind = NODES[kind]
    refused = rf"is a {re.escape(name)}.*never replaces anything else, not even with --force"
    with pytest.raises(OutputError, match=refused):
        A.write_atomic(target, "replaced\n")  # replace=True: what checkpoints use
    assert _state(target) == before and is_kind(os.lstat(target).st_mode)
    if kind == "symlink":
        assert (tmp_path / "mine.txt").read_text() == "mine\n"
    _no_temporaries(tmp_path)


@pytest.mark.parametrize("kind", list(NODES))
def test_init_force_refuses_each_kind_in_one_line_and_leaves_it(kind, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "target.yaml"
    _make(kind, target)
    before = _state(target)
    assert main(["init", str(target), "--force"]) == 2
    assert _one_line(capsys) == (f"regfw init: error: {str(target)!r} is a {NODES[kind][0]}"
                                 + (f" to {os.readlink(target)!r}" if kind in ("symlink", "dangling") else "")
                                 + (", which does not exist" if kind == "dangling" else "")
                                 + "; regfw writes only regular files and never replaces anything else, not even "
                                   "with --force. Choose another path.")
    assert _state(target) == before
    _no_temporaries(tmp_path)


def test_an_existing_file_is_replaced_only_when_asked_also_if_it_appears_during_the_write(tmp_path):
    target = tmp_path / "t.csv"
    target.write_text("mine\n")
    with pytest.raises(OutputError, match=r"t\.csv' exists; choose another path or pass --force to replace it"):
        A.write_atomic(target, "new\n", replace=False)
    assert target.read_text() == "mine\n"
    A.write_atomic(target, "new\n", replace=True)
    assert target.read_text() == "new\n"

    late = tmp_path / "late.csv"
    with pytest.raises(OutputError, match=r"late\.csv' exists"):  # noqa: PT012 - the file appears mid-write
        with A.atomic_open(late, "w", replace=False) as f:
            f.write("regfw's\n")
            late.write_text("someone else's\n")
    assert late.read_text() == "someone else's\n"
    _no_temporaries(tmp_path)


# -- predict --out ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_predict_out_needs_force_to_replace_its_table_and_a_full_disk_is_one_line(here, monkeypatch, capsys):
    tmp, ckpt = here
    assert main(["predict", "c.yaml", str(ckpt), "--out", "p.csv"]) == 0
    first = (tmp / "p.csv").read_text()
    capsys.readouterr()
    assert main(["predict", "c.yaml", str(ckpt), "--out", "p.csv", "uncertainty.threshold=0"]) == 2
    assert _one_line(capsys) == ("regfw predict: error: 'p.csv' exists; choose another path or pass --force to "
                                 "replace it.")
    assert (tmp / "p.csv").read_text() == first
    assert main(["predict", "c.yaml", str(ckpt), "--out", "p.csv", "uncertainty.threshold=0", "--force"]) == 0
    rows = list(csv.DictReader(open(tmp / "p.csv", newline="")))
    assert rows and all(r["refer"] == "True" and r["reason"] == "mutual_information > 0" for r in rows
                        if float(r["score"]) > 0)

    import errno
    import io

    class Full(io.FileIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    real = A._open_temporary
    monkeypatch.setattr(A, "_open_temporary", lambda path, mode, **kw: Full(path, "w")
                        if path.name.startswith(".q.csv.tmp-") else real(path, mode, **kw))
    capsys.readouterr()
    assert main(["predict", "c.yaml", str(ckpt), "--out", "q.csv"]) == 2
    assert _one_line(capsys) == ("regfw predict: error: cannot write 'q.csv': no space left on device; free some "
                                 "space, or write it elsewhere.")
    assert not (tmp / "q.csv").exists()
    _no_temporaries(tmp)


# -- rows a model cannot score --------------------------------------------------------------------------


def test_rows_with_non_finite_outputs_are_referred_with_their_reason_and_left_out_of_the_fraction():
    preds = [{"prediction": torch.tensor([0, 1, 2, 1, 0]),
              "mean_probs": torch.tensor([[1.0, 0, 0], [0, 1, 0], [float("nan")] * 3, [0, 1, 0], [1, 0, 0]]),
              "score": torch.tensor([0.1, 0.9, float("nan"), 0.3, float("inf")])}]
    rows = prediction_rows(preds, "mutual_information", refer_fraction=0.25)
    assert [r["refer"] for r in rows] == [False, True, True, False, True]
    assert [r["reason"] for r in rows] == ["", "top 0.25 by mutual_information", NONFINITE_OUTPUT, "",
                                           NONFINITE_OUTPUT]
    rows = prediction_rows(preds, "mutual_information", threshold=0.2)
    assert [r["refer"] for r in rows] == [False, True, True, True, True]
    assert rows[2]["reason"] == rows[4]["reason"] == NONFINITE_OUTPUT


@pytest.mark.slow
def test_a_finite_row_the_model_turns_into_nan_is_referred_by_predict_and_listed_by_rank(here, monkeypatch,
                                                                                        capsys):
    tmp, ckpt = here
    monkeypatch.setenv("OUT_HUGE_ROW", "5")  # 3e38 in every feature: finite, but the first layer overflows
    assert main(["predict", "c.yaml", str(ckpt), "--out", "p.csv"]) == 0
    rows = list(csv.DictReader(open(tmp / "p.csv", newline="")))
    assert rows[5]["refer"] == "True" and rows[5]["reason"] == NONFINITE_OUTPUT
    assert rows[5]["score"] == "nan"
    assert all(r["reason"] != NONFINITE_OUTPUT for i, r in enumerate(rows) if i != 5)
    capsys.readouterr()
    assert main(["rank", "c.yaml", str(ckpt), "--k", "1000"]) == 0
    out = capsys.readouterr().out.splitlines()
    ranked = [int(line.split("\t")[0]) for line in out[1:] if "\t" in line]
    assert 5 not in ranked and len(ranked) == len(rows) - 1
    assert out[-1] == "referred for review, not ranked (1: non-finite model output): 5"


# -- SIGINT in every command ---------------------------------------------------------------------------


def _interrupted(capsys, command: str) -> None:
    assert _one_line(capsys) == f"regfw {command}: interrupted (SIGINT)"


@pytest.mark.slow
def test_sigint_mid_work_exits_130_with_one_line_in_real_processes(here):
    """``predict`` and ``rank`` are interrupted inside their model pass (the third batch: the first two
    are the pass that checks the inputs), ``plan`` and ``demo`` while building the data."""
    tmp, ckpt = here
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp)}
    runs = {
        "predict": (["predict", "c.yaml", str(ckpt), "--out", "p.csv"], "val3"),
        "rank": (["rank", "c.yaml", str(ckpt)], "val3"),
        "plan": (["plan", "c.yaml"], "init"),
        "demo": (["demo", "c.yaml"], "init"),
    }
    procs = {}
    for name, (args, moment) in runs.items():
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "regfw", *args], cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env={**env, "OUT_STALL": moment, "OUT_MARKER": str(tmp / f"{name}.marker")})
    end = time.monotonic() + 300
    waiting = dict(procs)
    while waiting:
        for name, proc in list(waiting.items()):
            assert proc.poll() is None, f"{name} ended before its stall: {proc.stderr.read()[-2000:]}"
            if (tmp / f"{name}.marker").exists():
                proc.send_signal(signal.SIGINT)
                del waiting[name]
        assert time.monotonic() < end, f"never reached: {sorted(waiting)}"
        time.sleep(0.05)
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        lines = [line for line in err.splitlines() if line.startswith("regfw")]
        assert proc.returncode == 130, (name, err[-2000:])
        assert lines == [f"regfw {name}: interrupted (SIGINT)"] and "Traceback" not in err, (name, err[-2000:])
    assert not (tmp / "p.csv").exists() and not (tmp / "runs").exists()
    _no_temporaries(tmp)


def test_sigint_while_init_writes_leaves_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    real = A._open_temporary

    def interrupted(path, mode, **kw):
        f = real(path, mode, **kw)
        f.write("half")
        signal.raise_signal(signal.SIGINT)  # regfw's handler: a KeyboardInterrupt here
        return f

    monkeypatch.setattr(A, "_open_temporary", interrupted)
    assert main(["init", "my.yaml"]) == 130
    _interrupted(capsys, "init")
    assert list(tmp_path.iterdir()) == []


def test_sigint_while_new_plugin_writes_leaves_nothing(tmp_path, monkeypatch, capsys):
    import regfw.cli.new_plugin as scaffold

    real = scaffold.render_template

    class Interrupting(dict):
        def items(self):
            for i, item in enumerate(super().items()):
                if i == 2:
                    signal.raise_signal(signal.SIGINT)
                yield item

    monkeypatch.setattr(scaffold, "render_template", lambda name: Interrupting(real(name)))
    assert main(["new-plugin", "halfway", "--dir", str(tmp_path)]) == 130
    _interrupted(capsys, "new-plugin")
    assert list(tmp_path.iterdir()) == []


def test_sigint_while_plugins_are_listed(monkeypatch, capsys):
    import regfw.registry.discovery as plugins

    real = plugins.plugin_infos

    def interrupted():
        infos = real()
        signal.raise_signal(signal.SIGINT)
        return infos

    monkeypatch.setattr(plugins, "plugin_infos", interrupted)
    assert main(["plugins", "--check"]) == 130
    _interrupted(capsys, "plugins")


# -- places the file system refuses -------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories; the refusal needs a user")
def test_a_read_only_place_is_one_line_for_a_run_directory_init_and_predict(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(CONFIG.replace("out_data.Digits", "regfw.build.datasets.DigitsDataModule"))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(["fit", "c.yaml", "--run-dir", str(locked / "run")]) == 2
        assert _one_line(capsys) == (f"regfw fit: error: cannot create run directory {str(locked / 'run')!r}: "
                                     f"permission denied; it or its directory is not writable by you; make it "
                                     f"writable, or choose another location.")
        assert main(["init", str(locked / "my.yaml")]) == 2
        assert _one_line(capsys) == (f"regfw init: error: cannot write {str(locked / 'my.yaml')!r}: permission "
                                     f"denied; it or its directory is not writable by you; make it writable, or "
                                     f"choose another location.")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)
