"""Nothing lost, nothing executed: ``--force`` deletes only regfw's own files, a checkpoint cannot run
code when it is read, one process at a time trains in a run directory, and a failed start leaves
nothing for ``--resume`` to trip over. Each test is the one that would have caught the bug."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from regfw.cli.main import main
from regfw.errors import RunError
from regfw.run.checkpoints import read_checkpoint
from regfw.run.rundir import LOCK, MARKER, claim_existing, claim_new

CONFIG = """
data: {train_fraction: 0.1, batch_size: 64}
model: {init_args: {hidden: [8]}}
uncertainty: {enabled: false}
trainer: {max_epochs: 1, enable_progress_bar: false, enable_model_summary: false}
"""


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG)
    return path


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# -- 1. --force ------------------------------------------------------------------------------------


def test_force_never_takes_a_users_directory_for_a_run_nor_deletes_its_files(cfg, tmp_path, capsys):
    fake = tmp_path / "fakerun"
    fake.mkdir()
    (fake / "config.yaml").write_text("my own config\n")
    (fake / "thesis.tex").write_text("\\documentclass{article}\n")
    assert main(["fit", str(cfg), "--run-dir", str(fake), "--force"]) == 2
    err = _one_error_line(capsys)
    assert f"run directory '{fake}' is not empty and holds no regfw run (it has a config.yaml, but no regfw run " \
           f"marker" in err
    assert sorted(p.name for p in fake.iterdir()) == ["config.yaml", "thesis.tex"]
    assert (fake / "config.yaml").read_text() == "my own config\n"

    # a real regfw run with a file of the user's in it: --force refuses and names the file
    run = tmp_path / "run"
    assert main(["fit", str(cfg), "--run-dir", str(run)]) == 0
    assert (run / MARKER).is_file()
    (run / "notes.md").write_text("keep me")
    (run / "checkpoints" / "mine.txt").write_text("keep me too")
    capsys.readouterr()
    assert main(["fit", str(cfg), "--run-dir", str(run), "--force"]) == 2
    assert "holds files regfw did not write (checkpoints/mine.txt, notes.md); --force deletes only regfw's own " \
           "files" in _one_error_line(capsys)
    assert (run / "notes.md").read_text() == "keep me" and (run / "checkpoints" / "last.ckpt").is_file()


def test_force_needs_a_run_dir_and_an_empty_run_dir_is_refused(cfg, capsys):
    assert main(["fit", str(cfg), "--force"]) == 2
    assert "--force replaces the --run-dir directory; it needs --run-dir DIR" in _one_error_line(capsys)
    assert main(["fit", str(cfg), "--run-dir", ""]) == 2
    assert "--run-dir: got an empty path" in _one_error_line(capsys)
    assert not Path("runs").exists()


# -- 2. a checkpoint that runs code ------------------------------------------------------------------


class Payload:
    """Unpickling this creates the file ``target``: what a malicious checkpoint would do."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_pickle_payload_in_a_checkpoint_is_refused_before_it_runs(cfg, tmp_path, capsys):
    target = tmp_path / "pwned"
    payload = tmp_path / "payload.ckpt"
    torch.save({"state_dict": {}, "regfw": {}, "hyper_parameters": {}, "x": Payload(str(target))}, payload)
    for argv in (["fit", str(cfg), "--resume", str(payload)], ["rank", str(cfg), str(payload)]):
        assert main(argv) == 2
        err = _one_error_line(capsys)
        assert f"checkpoint '{payload}' holds Python objects other than tensors and plain data" in err
        assert "torch.load(weights_only=True)" in err
        assert not target.exists()  # the code never ran
    assert not Path("runs").exists()


# -- 3. one process per run directory ------------------------------------------------------------


def test_a_run_directory_is_claimed_by_one_process_and_a_stale_lock_is_taken_over(cfg, tmp_path, capsys):
    path = tmp_path / "shared"
    first = claim_new(path, explicit=True)
    with pytest.raises(RunError) as err:
        claim_new(path, explicit=True)  # a second process (a second open file) at the same moment
    assert str(err.value).startswith(f"run directory '{path}' is in use by process {os.getpid()} on ")
    first.release()

    run = tmp_path / "run"
    assert main(["fit", str(cfg), "--run-dir", str(run)]) == 0
    held = claim_existing(run)  # a first `--resume` of the run, still training
    try:
        assert main(["fit", str(cfg), "--run-dir", str(run), "--resume", "trainer.max_epochs=2"]) == 2
        assert f"is in use by process {os.getpid()}" in _one_error_line(capsys)
    finally:
        held.release()
    # a lock file left by a process that was killed names a PID that is gone: it is stale, taken over
    (run / LOCK).write_text('{"pid": 999999999, "host": "elsewhere", "started": "yesterday"}')
    assert main(["fit", str(cfg), "--run-dir", str(run), "--resume", "trainer.max_epochs=2"]) == 0
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["epoch"] == 1


def test_two_processes_starting_in_one_new_directory_never_share_it(cfg, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "regfw", "fit", str(cfg), "--run-dir", "same"], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    (loser,) = [err for rc, err in results if rc == 2]
    assert "is in use by process" in loser or "exists and is not empty" in loser
    rows = (tmp_path / "same" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,") and len(rows) == 3  # header, the step row, the epoch's validation row


# -- 4. a failed start ------------------------------------------------------------------------------

TUPLE_MODEL = '''
from torch import nn

class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 10)

    def forward(self, x):
        return self.lin(x), x
'''


def test_a_failed_start_leaves_nothing_and_resume_picks_the_newest_resumable_run(cfg, tmp_path, monkeypatch,
                                                                                 capsys):
    (tmp_path / "pair_model.py").write_text(textwrap.dedent(TUPLE_MODEL))
    monkeypatch.syspath_prepend(str(tmp_path))
    pair = tmp_path / "pair.yaml"
    pair.write_text(CONFIG.replace("model: {init_args: {hidden: [8]}}", "model: {class_path: pair_model.Pair}"))
    assert main(["fit", str(pair), "run.name=c"]) == 2  # fails in the first training step, after the claim
    assert "model: the first training step of 'pair_model.Pair' with cross_entropy loss on 'digits' failed: " \
           "TypeError: " in _one_error_line(capsys)
    assert not Path("runs").exists()  # not even the parent it would have made
    Path("mine").mkdir()  # a given empty directory stays, emptied again (Lightning's hparams.yaml too)
    assert main(["fit", str(pair), "--run-dir", "mine"]) == 2
    capsys.readouterr()
    assert Path("mine").is_dir() and not list(Path("mine").iterdir())

    assert main(["fit", str(cfg)]) == 0
    (good,) = Path("runs").iterdir()
    # a newer run killed before its first checkpoint (SIGKILL cannot be cleaned up after)
    time.sleep(1.1)
    killed = Path("runs") / f"c-{time.strftime('%Y%m%d-%H%M%S')}"
    killed.mkdir()
    (killed / "config.yaml").write_text((good / "config.yaml").read_text())
    capsys.readouterr()
    assert main(["fit", str(cfg), "--resume", "trainer.max_epochs=2"]) == 0
    assert f"resumed from:  {good}/checkpoints/last.ckpt" in capsys.readouterr().out
    assert read_checkpoint(good / "checkpoints" / "last.ckpt")["epoch"] == 1


# -- a full disk ---------------------------------------------------------------------------------------


def test_a_full_disk_is_named_and_the_older_checkpoint_stays_intact(cfg, tmp_path, monkeypatch, capsys):
    """ENOSPC is injected at the write layer of regfw.run.atomic (a real full file system needs a mount, which
    tests cannot portably make): the second write of last.ckpt fails half-way, as on a full disk."""
    import errno
    import io

    import regfw.run.atomic as A

    real_open = A._open_temporary
    writes = {"last": 0}

    class Full(io.FileIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def opener(path, mode, **kw):
        if path.name.startswith(".last.ckpt"):
            writes["last"] += 1
            if writes["last"] == 2:
                return Full(path, "w")
        return real_open(path, mode, **kw)

    monkeypatch.setattr(A, "_open_temporary", opener)
    run = tmp_path / "run"
    assert main(["fit", str(cfg), "--run-dir", str(run), "trainer.max_epochs=2"]) == 2
    err = _one_error_line(capsys)
    assert err == (f"regfw fit: error: no space left on device writing {run}/checkpoints/last.ckpt; the older files "
                   f"of the run are intact, its newest complete checkpoint is {run}/checkpoints/last.ckpt. Free some "
                   f"space and continue with `regfw fit {cfg} --run-dir {run} --resume`.")
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["epoch"] == 0  # the older one, whole
    assert not [p.name for p in run.rglob("*") if ".tmp-" in p.name]


def _full_at(monkeypatch, name: str) -> None:
    """The first write of ``name`` fails on a full disk (see the test above)."""
    import errno
    import io

    import regfw.run.atomic as A

    real_open = A._open_temporary

    class Full(io.FileIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def opener(path, mode, **kw):
        if path.name.startswith(f".{name}.tmp-"):
            monkeypatch.setattr(A, "_open_temporary", real_open)
            return Full(path, "w")
        return real_open(path, mode, **kw)

    monkeypatch.setattr(A, "_open_temporary", opener)


def test_a_full_disk_names_the_checkpoint_to_continue_from_or_that_nothing_was_kept(cfg, tmp_path, monkeypatch,
                                                                                   capsys):
    # the first last.ckpt fails after epoch=000.ckpt was written: that one is what to resume from
    run = tmp_path / "run"
    _full_at(monkeypatch, "last.ckpt")
    assert main(["fit", str(cfg), "--run-dir", str(run), "trainer.max_epochs=2"]) == 2
    epoch0 = run / "checkpoints" / "epoch=000.ckpt"
    assert _one_error_line(capsys) == (
        f"regfw fit: error: no space left on device writing {run}/checkpoints/last.ckpt; the older files of the run "
        f"are intact, its newest complete checkpoint is {epoch0}. Free some space and continue with `regfw fit "
        f"{cfg} --resume {epoch0}`.")
    assert not (run / "checkpoints" / "last.ckpt").exists()
    assert main(["fit", str(cfg), "--resume", str(epoch0), "trainer.max_epochs=2"]) == 0  # as the message says
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["epoch"] == 1

    # no checkpoint yet (the disk is full at config.yaml): nothing is kept, and the message says so
    _full_at(monkeypatch, "config.yaml")
    assert main(["fit", str(cfg), "--run-dir", str(tmp_path / "run2")]) == 2
    assert _one_error_line(capsys) == (f"regfw fit: error: no space left on device writing {tmp_path / 'run2'}/"
                                       f"config.yaml; nothing of the run was kept. Free some space and start it again.")
    assert not (tmp_path / "run2").exists()
    assert not [p.name for p in tmp_path.rglob("*") if ".tmp-" in p.name]
