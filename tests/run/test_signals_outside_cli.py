"""SIGTERM and SIGINT to a plain ``Trainer.fit`` of a ``RegularizedModule`` (a Python script, not
``regfw fit``) stop it as Lightning stops a bare LightningModule.

Lightning's signal connector installs a SIGTERM handler for the fit that only sets
``trainer.received_sigterm``; the training loop raises ``SIGTERMException`` (a ``SystemExit``) after
the current batch, and the evaluation loop after the current validation batch. SIGINT raises
``KeyboardInterrupt`` wherever the process is, which Lightning turns into ``sys.exit(1)`` after its
teardown. Real processes: each script trains for far longer than the test waits, is signalled
after its first steps, and must be gone within :data:`BOUND` seconds, the bare module under the
same script and load too.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

#: Seconds from the signal to the process's exit. Lightning itself stops within a batch (a few
#: milliseconds here); the rest is the interpreter's exit, slower on a loaded machine.
BOUND = 5.0


#: Seconds the test waits for a signalled process before calling it hung.
WAIT = 60


def bound(bare_took: float) -> float:
    """How long the regfw process may take to stop: :data:`BOUND`, or on a machine so loaded that
    the bare module (the same script without regfw) itself takes longer, twice what it took."""
    return max(BOUND, 2 * bare_took)

SCRIPT = r'''
import signal, sys, threading, time
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

kind, samples, val_rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[4])
torch.manual_seed(0)
x = torch.randn(278 + val_rows, 6)
y = x.sum(1, keepdim=True)
train = DataLoader(TensorDataset(x[:278], y[:278]), batch_size=128, shuffle=True)
val = DataLoader(TensorDataset(x[278:], y[278:]), batch_size=val_rows)


class Bare(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Dropout(0.05), nn.Linear(6, 50), nn.ReLU(), nn.Dropout(0.05), nn.Linear(50, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.mse_loss(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.mse_loss(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), weight_decay=1e-4)


class Watch(pl.Callback):
    """Says when training and validation are under way, at which training step the SIGTERM was first
    seen, and whether the fit ended inside a validation (a signal that lands there stops it there)."""
    seen = None
    validating = False

    def on_validation_start(self, trainer, pl_module):
        self.validating = True

    def on_validation_end(self, trainer, pl_module):
        self.validating = False

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if trainer.current_epoch == 1:
            print("VALIDATING", flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 10:
            print("TRAINING", flush=True)
        if self.seen is None and trainer.received_sigterm:
            self.seen = trainer.global_step


callbacks = [Watch()]
if kind == "bare":
    module = Bare()
else:
    from regfw.train.module import RegularizedModule

    net = nn.Sequential(nn.Linear(6, 50), nn.ReLU(), nn.Linear(50, 1))
    module = RegularizedModule(net, loss="mse", regularizers={"dropout": {"input": 0.05, "hidden": 0.05}},
                               optimizer={"name": "adam", "weight_decay": 1e-4}, example_input=x[:2])
    if samples:
        from regfw.uncertainty import MCDropoutUncertainty

        callbacks.append(MCDropoutUncertainty(task="regression", samples=samples, plot_dir=sys.argv[3]))
landed = {}


def note_where_it_landed(signum, frame):
    """Installed before the fit; Lightning's handler calls it too (it keeps a handler it finds)."""
    landed.setdefault("step", trainer.global_step)
    landed.setdefault("validating", callbacks[0].validating)


signal.signal(signal.SIGTERM, note_where_it_landed)
trainer = pl.Trainer(max_epochs=100000, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     callbacks=callbacks)
raised = None
try:
    trainer.fit(module, train, val)
except BaseException as exc:
    raised = type(exc).__name__
    raise
finally:
    others = [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    mc = callbacks[1].runs if callbacks[1:] else None
    print(f"STATE status={trainer.state.status.value} step={trainer.global_step} epoch={trainer.current_epoch} "
          f"seen={callbacks[0].seen} landed_at={landed.get('step')} landed_validating={landed.get('validating')} "
          f"in_validation={callbacks[0].validating} mc_runs={mc} threads={others} "
          f"raised={raised}", flush=True)
'''


def _stop(tmp_path, kind: str, signum: int, samples: int = 0, *, val_rows: int = 30,
          marker: str = "TRAINING") -> tuple[float, int, dict, str]:
    """Start the script, signal it once it prints ``marker`` (``TRAINING``: at step 10;
    ``VALIDATING``: as the second epoch's validation starts); seconds from the signal to its exit,
    its exit status, its last ``STATE`` line as a dict, and its output."""
    script = tmp_path / "fit_script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), kind, str(samples), str(tmp_path / "plots"), str(val_rows)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(marker):
            break
    else:
        proc.wait()
        pytest.fail(f"the {kind} script ended before {marker}:\n{''.join(lines)[-3000:]}")
    start = time.monotonic()
    proc.send_signal(signum)
    try:
        rest, _ = proc.communicate(timeout=WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"the {kind} script was still running {WAIT} s after {signal.Signals(signum).name}")
    took = time.monotonic() - start
    output = "".join(lines) + rest
    state_lines = [ln for ln in output.splitlines() if ln.startswith("STATE ")]
    assert state_lines, output[-3000:]
    state = dict(item.split("=", 1) for item in state_lines[-1].split()[1:])
    return took, proc.returncode, state, output


def _bare_stop(tmp_path, signum):
    """:func:`_stop` of the bare module: the baseline the regfw run is held to. A bare Lightning fit that is
    still running after the wait is run once more, and when it hangs again the test is skipped, saying so:
    regfw is not in that process, so there is nothing to hold regfw to. (Seen in clean-clone ``make test``
    runs for SIGINT, while ``.venv-zoo`` was being built beside the suite; alone it stops in under a second.)"""
    for attempt in range(2):
        try:
            return _stop(tmp_path, "bare", signum)
        except pytest.fail.Exception as exc:
            if "still running" not in str(exc):
                raise
            if attempt:
                pytest.skip(f"no baseline: {exc} twice (Lightning alone, no regfw in the process)")
    raise AssertionError("unreachable")


@pytest.mark.parametrize("kind,samples", [("regularized", 0), ("regularized", 30)],
                         ids=["RegularizedModule", "RegularizedModule+MC"])
def test_sigterm_stops_a_plain_fit_like_a_bare_module(tmp_path, kind, samples):
    bare_took, bare_rc, bare, bare_out = _bare_stop(tmp_path, signal.SIGTERM)
    took, rc, state, out = _stop(tmp_path, kind, signal.SIGTERM, samples)
    # the bare module: Lightning's own behaviour, the reference (SIGTERMException is SystemExit(None))
    assert bare["status"] == "interrupted" and bare_rc == 0, bare_out[-3000:]
    # the same for RegularizedModule: stopped by Lightning after the batch where the signal was seen
    assert took < bound(bare_took), f"{kind} took {took:.2f} s to stop (bare module: {bare_took:.2f} s)\n{out[-3000:]}"
    assert (state["status"], rc) == ("interrupted", 0), out[-3000:]
    assert (bare["raised"], state["raised"]) == ("SIGTERMException", "SIGTERMException"), out[-3000:]
    # wherever it lands (a training batch, a validation, the end of an epoch), Lightning stops at the
    # next check: at most one training step is taken after the signal
    assert int(state["step"]) - int(state["landed_at"]) <= 1, state
    if state["seen"] != "None":  # seen between training batches: stopped after that batch
        assert int(state["step"]) - int(state["seen"]) <= 1, state
    assert state["threads"] == "[]", state  # no plot thread (or any other) left to wait for


def test_sigint_stops_a_plain_fit_like_a_bare_module(tmp_path):
    bare_took, bare_rc, bare, bare_out = _bare_stop(tmp_path, signal.SIGINT)
    took, rc, state, out = _stop(tmp_path, "regularized", signal.SIGINT, 30)
    assert (bare["status"], bare_rc) == ("interrupted", 1), bare_out[-3000:]
    assert took < bound(bare_took), \
        f"RegularizedModule took {took:.2f} s to stop (bare module: {bare_took:.2f} s)\n{out[-3000:]}"
    assert (state["status"], rc) == ("interrupted", 1), out[-3000:]
    assert "Detected KeyboardInterrupt" in out and state["raised"] == bare["raised"] == "SystemExit", out[-3000:]
    assert state["threads"] == "[]", state


def test_sigterm_during_a_long_mc_validation_stops_at_once(tmp_path):
    """The MC callback's T = 20,000 passes over a validation batch of 1024 rows take about 4 s of
    CPU; Lightning alone would stop only after them (it looks between batches). The module stops
    the evaluation epoch at the signal: the second epoch's MC run never completes. (By what ran, not
    by seconds: on a loaded machine a clock says little; the seconds are in the message.)"""
    took, rc, state, out = _stop(tmp_path, "regularized", signal.SIGTERM, 20000, val_rows=1024, marker="VALIDATING")
    timing = f"RegularizedModule took {took:.2f} s to stop"
    assert (state["status"], state["raised"], rc) == ("interrupted", "SIGTERMException", 0), f"{timing}\n{out[-3000:]}"
    # stopped inside the second epoch's validation: only the first epoch's MC run completed (the
    # counter goes up when a run's T samples are all taken), and no training step after the signal
    assert (state["epoch"], state["step"], state["mc_runs"]) == ("1", "6", "1"), f"{timing}: {state}"
    assert state["threads"] == "[]", state


def test_the_evaluation_handler_is_in_place_only_while_an_evaluation_epoch_runs():
    """In one process: the SIGTERM handler during training is Lightning's, during a validation epoch
    the module's wrapper around it, and after the fit the one that was there before."""
    import pytorch_lightning as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from regfw.train.module import RegularizedModule

    class Handlers(pl.Callback):
        def __init__(self):
            self.train, self.val = [], []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.train.append(signal.getsignal(signal.SIGTERM))

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            self.val.append(signal.getsignal(signal.SIGTERM))

    torch.manual_seed(0)
    x = torch.randn(64, 6)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=32)
    module = RegularizedModule(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1)), loss="mse",
                               regularizers={"dropout": {"hidden": 0.1}}, example_input=x[:2])
    handlers = Handlers()
    before = signal.getsignal(signal.SIGTERM)
    pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, num_sanity_val_steps=0, callbacks=[handlers]).fit(module, data, data)
    assert signal.getsignal(signal.SIGTERM) is before
    assert len(handlers.train) == 4 and len(handlers.val) == 4
    lightning = handlers.train[0]
    assert type(lightning).__name__ == "_HandlersCompose"  # Lightning's, for the whole fit
    assert all(h is lightning for h in handlers.train)  # put back after each validation epoch
    assert all(h is not lightning and callable(h) for h in handlers.val)
    assert handlers.val[0] is handlers.val[1] and handlers.val[1] is not handlers.val[2]  # one wrapper an epoch
