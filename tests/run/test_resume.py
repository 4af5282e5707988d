"""Kill a training run mid-epoch (SIGKILL, SIGTERM), resume it, and get the uninterrupted run's weights.

The runs are tiny (an MLP on 30% of digits, 2 epochs of 13 steps) and deterministic
(``trainer.deterministic``, fixed seed). A training data module of the test stalls on one batch
fetch and writes a marker file, so the signal arrives at a known step no matter how loaded the
machine is. The config includes ``adaptive_dropout`` (its rates move after epoch 0, so a resumed
run that lost them would diverge) and the MC dropout callback (its state resumes too).
"""
from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_kill_matrix import KILL_AFTER

from regfw.config.schema import load_config
from regfw.errors import RunError
from regfw.run import distributed as D
from regfw.run.checkpoints import read_checkpoint
from regfw.run.job import fit

STALL_DATA = '''
import os, time
from pathlib import Path
from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate
from regfw.build.datasets import DigitsDataModule

CALLS = 0

def stalling_collate(batch):
    """Default collate; the REGFW_TEST_STALL_AT-th call writes a marker file and sleeps."""
    global CALLS
    CALLS += 1
    if CALLS == int(os.environ.get("REGFW_TEST_STALL_AT", "0")):
        Path(os.environ["REGFW_TEST_STALL_FILE"]).write_text(str(CALLS))
        time.sleep(float(os.environ.get("REGFW_TEST_STALL_S", "0")))
    return default_collate(batch)

class StallingDigits(DigitsDataModule):
    def train_dataloader(self):
        return DataLoader(self.train_dataset(), batch_size=self.batch_size, shuffle=True,
                          collate_fn=stalling_collate)
'''

CONFIG = """
seed: 0
data: {class_path: stall_data.StallingDigits, init_args: {batch_size: 32, train_fraction: 0.3}}
model: {name: mlp, init_args: {hidden: [32], in_features: 64, num_outputs: 10}}
optimizer: {name: adam, lr: 0.01}
regularizers:
  dropout: {hidden: 0.4}
  adaptive_dropout: {patience: 1, loss_threshold: 0.5, step: 0.1}  # underfits early: rates go down
uncertainty: {enabled: true, samples: 4, plots: false}
trainer: {max_epochs: 2, deterministic: true, enable_progress_bar: false, enable_model_summary: false,
          log_every_n_steps: 1}
run: {checkpoint_every_n_steps: 5}
"""
STEPS = 26  # 2 epochs x 13 batches
STALL_AT = 18  # the fetch of the batch of global step 17; last.ckpt then holds step 15


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A directory with the config and the stalling data module, and the uninterrupted run in it."""
    root = tmp_path_factory.mktemp("resume")
    (root / "stall_data.py").write_text(STALL_DATA)
    (root / "cfg.yaml").write_text(CONFIG)
    sys.path.insert(0, str(root))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        reference = fit(load_config("cfg.yaml"), run_dir="reference", quiet=True)
    finally:
        os.chdir(cwd)
        sys.path.remove(str(root))
    return root, reference


def _start(root: Path, *args: str, stall_s: float, marker: Path) -> subprocess.Popen:
    # the same number of threads as this process: CPU kernels sum in another order with another count,
    # and the comparison is bitwise
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "REGFW_TEST_STALL_AT": str(STALL_AT),
           "REGFW_TEST_STALL_S": str(stall_s), "REGFW_TEST_STALL_FILE": str(marker)}
    env.pop(D.RUN_DIR_ENV, None)
    return subprocess.Popen([sys.executable, "-m", "regfw", "fit", "cfg.yaml", *args], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(marker: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before the stall (rc {proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("the run never reached the stalled batch")
        time.sleep(0.05)


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_weights(workdir, monkeypatch, capsys):
    root, reference = workdir
    marker = root / "stalled-kill"
    proc = _start(root, stall_s=120, marker=marker)
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    (run,) = [p for p in (root / "runs").iterdir() if p.name.startswith("cfg-")]
    killed = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert killed["global_step"] == 15 and killed["epoch"] == 1  # mid-epoch 1
    assert killed["callbacks"]["MCDropoutUncertainty{'task': 'classification', 'prefix': 'mc/'}"]["runs"] == 1
    config_before = (run / "config.yaml").read_text()

    # `regfw fit cfg.yaml --resume` (in this process): the newest run of cfg.yaml, from its last.ckpt, in
    # its directory
    monkeypatch.chdir(root)
    monkeypatch.syspath_prepend(str(root))
    from regfw.cli.main import main

    assert main(["fit", "cfg.yaml", "--resume", "trainer.enable_progress_bar=false"]) == 0
    assert f"resumed from:  runs/{run.name}/checkpoints/last.ckpt" in capsys.readouterr().out
    assert [p.name for p in (root / "runs").iterdir() if p.name.startswith("cfg-")] == [run.name]  # no new one
    final = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert final["global_step"] == STEPS
    assert _same_weights(final["state_dict"], reference.module.state_dict())  # bitwise
    ref_rates = read_checkpoint(reference.checkpoint)["regfw"]["rates"]
    assert final["regfw"]["rates"] == ref_rates
    assert ref_rates["body.1.regfw_dropout"] < 0.4  # the schedule moved, and resumed where it was
    mc_state = final["callbacks"]["MCDropoutUncertainty{'task': 'classification', 'prefix': 'mc/'}"]
    assert mc_state["runs"] == 2  # the callback's own state went on from the checkpoint

    # the run directory was continued, not rewritten: same config, a resume note, one metrics file
    assert (run / "config.yaml").read_text() == config_before
    note = (run / "resume-1.yaml").read_text()
    assert note.startswith("# resumed ") and "(epoch 1, global step 15)" in note.splitlines()[0]
    val = [(r["epoch"], r["val_loss"]) for r in _rows(run) if r.get("val_loss")]
    ref_val = [(r["epoch"], r["val_loss"]) for r in _rows(root / reference.run_dir) if r.get("val_loss")]
    assert val == ref_val  # epoch 0 logged before the kill, epoch 1 after the resume, identical values


def test_sigterm_saves_the_current_step_and_resume_is_exact(workdir, monkeypatch):
    root, reference = workdir
    marker = root / "stalled-term"
    proc = _start(root, "--run-dir", "term", stall_s=2, marker=marker)
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    # Lightning finishes the batch in flight; regfw saves last.ckpt right there
    assert ("regfw fit: error: stopped by SIGTERM at global step 18 (epoch 1); saved "
            f"{os.path.realpath(root / 'term' / 'checkpoints')}/last.ckpt at global step 18. Continue with "
            "`regfw fit cfg.yaml --run-dir term --resume`.") in err
    assert read_checkpoint(root / "term" / "checkpoints" / "last.ckpt")["global_step"] == 18

    monkeypatch.chdir(root)
    monkeypatch.syspath_prepend(str(root))
    resumed = fit(load_config("cfg.yaml"), run_dir="term", resume=True, quiet=True)
    assert resumed.resumed_from == Path("term/checkpoints/last.ckpt")
    assert _same_weights(resumed.module.state_dict(), reference.module.state_dict())


def test_resume_from_a_checkpoint_outside_a_run_starts_a_new_run_directory(workdir, monkeypatch, tmp_path):
    root, reference = workdir
    monkeypatch.chdir(root)
    monkeypatch.syspath_prepend(str(root))
    loose = tmp_path / "copied.ckpt"
    loose.write_bytes(Path(reference.checkpoint).read_bytes())
    cfg = load_config("cfg.yaml", ["trainer.max_epochs=3", "run.name=more"])
    result = fit(cfg, resume=str(loose), quiet=True)
    assert result.run_dir.name.startswith("more-") and result.run_dir.parent == Path("runs")
    assert (result.run_dir / "config.yaml").is_file() and (result.run_dir / "resume-1.yaml").is_file()
    assert read_checkpoint(result.checkpoint)["global_step"] == STEPS + 13  # one more epoch
    # a checkpoint at the top of a run directory (Lightning's SLURM hpc_ckpt_N.ckpt) continues that run
    shutil.copytree(root / "reference", root / "hpc")
    shutil.copyfile(reference.checkpoint, root / "hpc" / "hpc_ckpt_1.ckpt")
    again = fit(load_config("cfg.yaml", ["trainer.max_epochs=3"]), resume="hpc/hpc_ckpt_1.ckpt", quiet=True)
    assert again.run_dir == Path("hpc") and (root / "hpc" / "resume-1.yaml").is_file()
    # a checkpoint that lies in a run directory must belong to the --run-dir given with it
    with pytest.raises(RunError, match="belongs to run 'reference', not to --run-dir 'elsewhere'"):
        fit(cfg, resume="reference/checkpoints/last.ckpt", run_dir="elsewhere")
    with pytest.raises(RunError, match="--resume continues a run and --force replaces one"):
        fit(cfg, resume=True, force=True)


def test_resume_without_a_run_or_a_checkpoint_says_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["run.name=nothing"])
    with pytest.raises(RunError) as err:
        fit(cfg, resume=True)
    assert str(err.value) == ("--resume: no run of 'nothing' under 'runs' (looked for nothing-YYYYmmdd-HHMMSS); "
                              "pass the checkpoint (`--resume PATH`) or the run (`--run-dir DIR --resume`).")
    (tmp_path / "runs" / "nothing-20260101-000000").mkdir(parents=True)
    with pytest.raises(RunError, match="run 'runs/nothing-20260101-000000' has no checkpoints/last.ckpt"):
        fit(cfg, resume=True)
    assert list((tmp_path / "runs").iterdir()) == [tmp_path / "runs" / "nothing-20260101-000000"]


# -- the pieces that make resume exact -------------------------------------------------------


def test_resumable_loader_skips_the_trained_batches_and_keeps_the_epoch_order():
    from torch.utils.data import DataLoader, TensorDataset

    data = TensorDataset(torch.arange(40))
    plain = DataLoader(data, batch_size=4, shuffle=True)
    a = D.resumable_loader(plain, seed=3)
    assert isinstance(a, D.ResumableDataLoader) and len(a) == 10
    a.sampler.set_epoch(2)
    it = iter(a)
    first = [next(it)[0].tolist() for _ in range(3)]
    state = a.state_dict()
    assert state == {"epoch": 2, "batches": 3, "length": 10}
    rest = [b[0].tolist() for b in it]

    b = D.resumable_loader(DataLoader(data, batch_size=4, shuffle=True), seed=3)  # a fresh process
    b.load_state_dict(state)
    assert [x[0].tolist() for x in b] == rest  # the same epoch-2 order, minus what was trained on
    b.sampler.set_epoch(2)
    assert [x[0].tolist() for x in b][:3] == first  # only the first iterator skips
    b.sampler.set_epoch(3)
    assert sorted(sum((x[0].tolist() for x in b), [])) == list(range(40))  # epoch 3: all, another order
    assert [x[0].tolist() for x in b] != first + rest
    # a complete epoch in the state: the next iterator is the next epoch, in full
    c = D.resumable_loader(DataLoader(data, batch_size=4, shuffle=True), seed=3)
    c.load_state_dict({"epoch": 2, "batches": 10, "length": 10})
    d = D.resumable_loader(DataLoader(data, batch_size=4, shuffle=True), seed=3)
    d.sampler.set_epoch(3)
    assert [x[0].tolist() for x in c] == [x[0].tolist() for x in d]


def test_loaders_that_cannot_be_made_resumable_are_left_alone():
    from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

    data = TensorDataset(torch.arange(8))
    custom = DataLoader(data, batch_size=2, sampler=WeightedRandomSampler([1.0] * 8, 8))
    assert D.resumable_loader(custom, seed=0) is custom
    sequential = D.resumable_loader(DataLoader(data, batch_size=3), seed=0)
    assert isinstance(sequential, D.ResumableDataLoader)
    assert [b[0].tolist() for b in sequential] == [[0, 1, 2], [3, 4, 5], [6, 7]]


def test_without_the_resumable_order_and_step_seeds_a_resume_diverges(workdir, monkeypatch):
    """The control: with Lightning's plain loader and one seed per run, the same interruption and
    resume end with other weights than the same settings uninterrupted."""
    import pytorch_lightning as pl

    root, _ = workdir
    monkeypatch.chdir(root)
    monkeypatch.syspath_prepend(str(root))

    class Stop(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 17:
                raise RuntimeError("stopped at step 17")

    monkeypatch.setattr(D, "make_resumable", lambda dm, seed: dm)
    monkeypatch.setattr(D, "StepSeeding", lambda seed: pl.Callback())
    cfg = load_config("cfg.yaml")
    plain = fit(cfg, run_dir="plain", quiet=True)
    with pytest.raises(RuntimeError, match="stopped at step 17"):
        fit(cfg, run_dir="control", callbacks=[Stop()], quiet=True)
    assert read_checkpoint(root / "control" / "checkpoints" / "last.ckpt")["global_step"] == 15
    resumed = fit(cfg, run_dir="control", resume=True, quiet=True)
    assert not _same_weights(resumed.module.state_dict(), plain.module.state_dict())


def test_metrics_csv_is_continued_and_rows_after_the_checkpoint_are_dropped(tmp_path):
    from regfw.run.checkpoints import RunCSVLogger

    (tmp_path / "metrics.csv").write_text("epoch,step,train_loss\n0,1,0.9\n0,3,0.7\n0,5,0.5\n0,6,0.")  # cut short
    # the checkpoint was at global step 4: rows logged at steps 0-3 (batches 1-4) stay, those of steps 4-6 are redone
    logger = RunCSVLogger(tmp_path, keep_until_step=4)
    logger.log_metrics({"val_loss": 0.6, "epoch": 0}, step=4)
    logger.save()
    rows = _rows(tmp_path)
    assert [(r["step"], r["train_loss"], r["val_loss"]) for r in rows] == [("1", "0.9", ""), ("3", "0.7", ""),
                                                                           ("4", "", "0.6")]


def test_resume_at_an_epoch_end_with_loader_workers_keeps_the_next_epochs_order(tmp_path, monkeypatch):
    """A loader with workers draws its indices when its iterator is made, and Lightning makes the
    first one before it sets the epoch of a resumed run; the loader waits for the first batch."""
    import pytorch_lightning as pl

    monkeypatch.chdir(tmp_path)

    class Stop(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 14:
                raise RuntimeError("stopped at step 14")

    cfg = load_config(None, ["data.num_workers=1", "data.train_fraction=0.3", "data.batch_size=32",
                             "model.init_args={hidden: [16]}", "uncertainty.enabled=false", "trainer.max_epochs=2",
                             "trainer.enable_progress_bar=false"])
    full = fit(cfg, run_dir="full", quiet=True)
    with pytest.raises(RuntimeError, match="stopped at step 14"):
        fit(cfg, run_dir="cut", callbacks=[Stop()], quiet=True)
    assert read_checkpoint(tmp_path / "cut" / "checkpoints" / "last.ckpt")["global_step"] == 13  # epoch 0's end
    resumed = fit(cfg, run_dir="cut", resume=True, quiet=True)
    assert _same_weights(resumed.module.state_dict(), full.module.state_dict())




def test_sigkill_the_moment_the_epoch_checkpoint_appears_keeps_metrics_csv_identical(workdir, monkeypatch):
    """Lightning logs an epoch's training row after the epoch's checkpoints: a kill between the two
    must not lose it (the row travels in the checkpoint), with the MC callback and a rate schedule."""
    root, reference = workdir
    (root / "kill_after.py").write_text(KILL_AFTER)
    marker = root / "epoch-visible.marker"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "KM_MARKER": str(marker), "KM_AFTER": "last.ckpt:3"}  # steps 5, 10, then the end of epoch 0 (13)
    env.pop(D.RUN_DIR_ENV, None)
    proc = subprocess.Popen([sys.executable, "kill_after.py", "fit", "cfg.yaml", "--run-dir", "epoch-visible"],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    run = root / "epoch-visible"
    killed = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert killed["global_step"] == 13 and killed["epoch"] == 0  # the epoch's own checkpoint
    assert not [r for r in _rows(run) if r.get("train_loss")]  # the kill came before the training row

    monkeypatch.chdir(root)
    monkeypatch.syspath_prepend(str(root))
    from regfw.cli.main import main

    assert main(["fit", "cfg.yaml", "--run-dir", "epoch-visible", "--resume"]) == 0
    final = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert _same_weights(final["state_dict"], reference.module.state_dict())  # bitwise
    assert (run / "metrics.csv").read_bytes() == (root / reference.run_dir / "metrics.csv").read_bytes()
