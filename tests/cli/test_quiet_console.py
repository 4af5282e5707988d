"""A quiet console: what ``regfw fit``, ``demo`` and ``predict`` print through a pipe is their own
report (one summary, every metric once, under its metrics.csv name) and nothing else: no progress
bar, no Lightning advert or accelerator line, no model summary, no warning. On a terminal (a
pseudo-terminal here) the progress bar is drawn. The filters that quiet Lightning live only inside
regfw's own fit: a program using regfw as a library keeps its filters, and its own warnings show.
"""
from __future__ import annotations

import csv
import fcntl
import logging
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "templates" / "demo.yaml")
#: Small and quick: batch_size=256 leaves 3 training batches an epoch, fewer than Lightning's default
#: logging interval (which would warn "The number of training batches (3) is smaller than ...").
QUICK = ("trainer.max_epochs=2", "data.batch_size=256", "uncertainty.samples=5", "uncertainty.every_n_epochs=1")
#: Text that only Lightning's progress bar, model summary, adverts and info lines print.
NOISE = ("it/s]", "\r", "Sanity Checking", "Epoch 0:", "Trainable params", "💡", "Tip:", "litlogger", "litmodels",
         "GPU available", "TPU available", "`Trainer.fit` stopped", "Warning", "warn(", "deprecated")


def _noise(text: str) -> list[str]:
    return [n for n in NOISE if n in text]


def _printed_metrics(out: str) -> list[str]:
    """The metric names of a summary's ``  NAME  VALUE ...`` lines and of its two tables (whose rows
    and columns spell the ``cal/`` and ``ood/`` names)."""
    names = re.findall(r"^  ([a-z]+(?:/[a-z0-9_]+|_[a-z0-9_]+))\s+-?\d+\.\d{4}\b", out, flags=re.M)
    return names


def test_fit_and_predict_through_a_pipe_print_their_report_and_nothing_else(tmp_path, run_cli):
    fit = run_cli("fit", DEMO, *QUICK, "--run-dir", "run")
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert fit.stderr == ""  # no warning, no Lightning line: the batches < logging interval warning included
    assert _noise(fit.stdout) == [], fit.stdout[-3000:]
    out = fit.stdout
    assert out.count("Final evaluation") == 1 and out.count("run directory: run") == 1
    names = _printed_metrics(out)
    assert len(names) == len(set(names)) and "mc/acc" in names and "val_acc" in names, names
    columns = set(next(csv.reader((tmp_path / "run" / "metrics.csv").open())))
    assert set(names) <= columns, set(names) - columns  # one naming: the CSV's
    assert not re.search(r"^\s*(mc|cal|ood)_\w+:?\s+-?\d", out, flags=re.M)  # no second naming (mc_acc: ...)
    assert "temperature" in out and re.search(r"^  mutual_information\s+AUROC 0\.\d{4}", out, flags=re.M)

    pred = run_cli("predict", DEMO, "run/checkpoints/last.ckpt", "--out", "preds.csv", "uncertainty.samples=5")
    assert pred.returncode == 0 and pred.stderr == "", pred.stderr[-3000:]
    rows = list(csv.reader((tmp_path / "preds.csv").open()))
    header, body = rows[0], rows[1:]
    assert pred.stdout.splitlines() == [pred.stdout.strip()]  # one line: what it wrote
    assert pred.stdout.startswith(f"wrote preds.csv: {len(body)} predictions, ")
    assert pred.stdout.strip().endswith(f"one row per input, {len(header)} columns: {', '.join(header)}")


def test_demo_through_a_pipe_prints_one_summary(tmp_path, run_cli):
    demo = run_cli("demo", DEMO, "trainer.max_epochs=1", "data.batch_size=256", "uncertainty.samples=5",
                   "uncertainty.every_n_epochs=1")
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert demo.stderr == "" and _noise(demo.stdout) == [], demo.stdout[-3000:] + demo.stderr[-3000:]
    out = demo.stdout
    names = _printed_metrics(out)
    assert len(names) == len(set(names)) and "mc/acc" in names, names
    assert out.count("Monte Carlo dropout on the validation set") == 1 and out.count("run directory:") == 1
    header = next(line for line in out.splitlines() if line.startswith("run "))
    assert header.split()[1:5] == ["train_loss", "val_loss", "train_acc", "val_acc"]  # the CSV's names


def _on_a_terminal(args: list[str], cwd: Path, timeout: float = 300) -> tuple[int, str]:
    """Run ``args`` with stdout and stderr on a pseudo-terminal; its exit status and output."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a new pty is 0 columns wide
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=cwd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed its end
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(timeout=60), b"".join(chunks).decode("utf-8", "replace")


def test_a_terminal_gets_the_progress_bar(tmp_path):
    code, out = _on_a_terminal([sys.executable, "-m", "regfw", "fit", DEMO, "trainer.max_epochs=1",
                                "data.batch_size=256", "uncertainty.enabled=false", "--run-dir", "run"], tmp_path)
    assert code == 0, out[-3000:]
    assert re.search(r"Epoch 0: 100%.*\d+/\d+", out) and "it/s" in out, out[-3000:]
    assert "Final evaluation" in out and "💡" not in out and "Warning" not in out


class _Tiny(pl.LightningDataModule):
    """Four batches of random digits-like data, held as tensors."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.x, self.y), batch_size=16)

    val_dataloader = train_dataloader


class _UsersWarning(pl.Callback):
    """A caller's callback: its warnings must reach the caller, whatever regfw filters."""

    def on_train_start(self, trainer, pl_module):
        warnings.warn("the caller's own warning", UserWarning, stacklevel=1)
        # the text of a warning regfw drops, but from the caller's module, not Lightning's: it passes
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, from the caller", FutureWarning, stacklevel=1)


def test_fit_as_a_library_keeps_the_callers_filters_and_shows_its_warnings(tmp_path, monkeypatch):
    from regfw.config.schema import validate
    from regfw.run.job import fit

    monkeypatch.chdir(tmp_path)
    cfg = validate({"seed": 0, "data": {"name": "digits", "batch_size": 256, "train_fraction": 0.3},
                    "model": {"name": "mlp"}, "regularizers": {"dropout": {}},
                    "uncertainty": {"enabled": False}, "trainer": {"max_epochs": 1}})
    lightning_loggers = [logging.getLogger(n) for n in ("pytorch_lightning.utilities.rank_zero",
                                                        "lightning_fabric.utilities.rank_zero")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("error", message="a filter of the caller's")
        before = list(warnings.filters)
        logger_filters = [list(lg.filters) for lg in lightning_loggers]
        result = fit(cfg, run_dir="run", callbacks=[_UsersWarning()])
        assert warnings.filters == before  # the caller's filters, in order, and none of regfw's
        assert [list(lg.filters) for lg in lightning_loggers] == logger_filters
    shown = [str(w.message) for w in caught]
    assert "the caller's own warning" in shown and any("from the caller" in m for m in shown), shown
    assert not any("treespec" in m and "from the caller" not in m for m in shown), shown  # Lightning's: dropped
    assert result.metrics["val_acc"] > 0


def test_plan_for_returns_the_plan_as_printed(capsys):
    from regfw import Regularize

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))

        def forward(self, x):
            return self.body(x)

    plan = Regularize({"dropout": {}}, n_examples=500, example_input=torch.zeros(2, 8)).plan_for(Net())
    print(plan)
    printed = capsys.readouterr().out
    assert printed == plan.format() + "\n" and repr(plan) == str(plan) == plan.format()
    lines = printed.splitlines()
    assert lines[0].startswith("plan: N=500 training examples") and lines[1].split()[:3] == ["regularizer", "path",
                                                                                              "kind"]
    assert sorted({line.split()[1] for line in lines[2:] if line.startswith("dropout ")}) == ["body.0", "body.2"]


class _Listed(torch.utils.data.Dataset):
    """Examples made on access (as files read from disk are): not tensors held in memory."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        return torch.full((4,), float(i)), i % 2


class _FromDisk(_Tiny):
    def train_dataloader(self):
        return torch.utils.data.DataLoader(_Listed(), batch_size=4)


WORKERS = ("The 'train_dataloader' does not have many workers which may be a bottleneck. Consider increasing the "
           "value of the `num_workers` argument` to `num_workers=15` in the `DataLoader` to improve performance.")


def _shown(in_memory: bool, module: str) -> list[str]:
    """The warnings that reach the caller when ``module`` warns :data:`WORKERS` inside regfw's fit."""
    from pytorch_lightning.utilities.warnings import PossibleUserWarning

    from regfw.run.console import quiet_lightning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_lightning(in_memory=in_memory):
            warnings.warn_explicit(WORKERS, PossibleUserWarning, "data_connector.py", 436, module=module)
    return [str(w.message) for w in caught]


def test_worker_advice_is_dropped_only_for_data_held_as_tensors():
    """Lightning advises DataLoader workers on machines with more than two cores: for tensors in memory a
    worker only copies what the main process holds, so regfw drops that advice there, and only there."""
    from regfw.run.console import holds_tensors

    assert holds_tensors(_Tiny()) and not holds_tensors(_FromDisk())
    lightning = "pytorch_lightning.trainer.connectors.data_connector"  # where Lightning's check warns from
    assert _shown(True, lightning) == []
    assert _shown(False, lightning) == [WORKERS]  # data read on access: the advice may help, it stays
    assert _shown(True, "my_project.data") == [WORKERS]  # the same words from the caller's code stay too
