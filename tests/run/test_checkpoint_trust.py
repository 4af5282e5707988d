"""Checkpoints are verified whole before they are resumed or sampled, and a checkpoint written with
``regfw.Regularize`` never loads without its regularizers.

* the digest covers the tensors, hyperparameters, loop state and regfw's metadata, and survives the
  save/load round trip;
* a checkpoint without its digest, with edited content or from another regfw version is refused
  (the bad-input cases in tests/badinput_cases/checkpoints.py), and accepted knowingly with
  ``--accept-unverified`` / ``--accept-version`` (or the keywords) with one notice line;
* a file that is not a torch checkpoint is told apart from one holding Python objects;
* ``MyModule.load_from_checkpoint`` of a ``Regularize`` checkpoint fails naming ``load_regularized``,
  which (and a Trainer resuming with the callback) restores the regularizers.
"""
from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from regfw import __version__
from regfw.cli.main import main
from regfw.errors import RunError
from regfw.run.checkpoint_trust import accepting
from regfw.run.checkpoints import INTEGRITY_KEY, AtomicCheckpointIO, content_digest, read_checkpoint, safe_load, seal
from regfw.train.regularize import LOAD_MARK, Regularize, load_regularized
from regfw.uncertainty import stochastic_modules

CONFIG = """\
seed: 0
data: {train_fraction: 0.1, batch_size: 64}
model: {init_args: {hidden: [8]}}
regularizers: {dropout: {hidden: 0.3}}
uncertainty: {samples: 3, plots: false}
trainer: {max_epochs: 1, enable_progress_bar: false, enable_model_summary: false}
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished one-epoch run of CONFIG, and edited copies of its last.ckpt."""
    root = tmp_path_factory.mktemp("trust")
    (root / "c.yaml").write_text(CONFIG)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["fit", "c.yaml", "--run-dir", "run"]) == 0
    finally:
        os.chdir(cwd)
    last = root / "run" / "checkpoints" / "last.ckpt"

    def variant(name: str, change, reseal: bool = False) -> Path:
        ckpt = safe_load(last)
        change(ckpt)
        torch.save(seal(ckpt) if reseal else ckpt, root / name)
        return root / name

    def no_digest_edited(c):
        c.pop(INTEGRITY_KEY)
        c["state_dict"]["model.head.weight"] += 0.5

    variant("nodigest.ckpt", no_digest_edited)
    def rate09(c):  # the hidden rate, in the hyperparameters and in the rates a schedule would have set
        c["hyper_parameters"]["regularizers"]["dropout"].update(hidden=0.9)
        c["regfw"]["rates"] = {k: 0.9 if v == 0.3 else v for k, v in c["regfw"]["rates"].items()}

    variant("rate09.ckpt", rate09)
    variant("oldversion.ckpt", lambda c: c["regfw"].update(version="0.0.1"), reseal=True)
    return root


# -- what the digest covers ------------------------------------------------------------------------


def _sample() -> dict:
    return {"state_dict": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(0)},
            "hyper_parameters": {"regularizers": {"dropout": {"hidden": 0.3}}, "input_shape": [2, 64]},
            "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 1}}}},
            "optimizer_states": [{"state": {0: {"m": torch.ones(2)}},
                                  "param_groups": [{"lr": 0.01, "betas": (0.9, 0.99)}]}],
            "epoch": 1, "global_step": 7, "regfw": {"version": __version__, "rates": {"a": 0.3}}}


def test_the_digest_survives_the_round_trip_and_covers_every_entry(tmp_path):
    path = tmp_path / "c.ckpt"
    AtomicCheckpointIO().save_checkpoint(_sample(), path)
    saved = safe_load(path)
    record = saved[INTEGRITY_KEY]
    assert record["scheme"] == 2 and record["tensors"] == 3
    assert record["covers"] == ["epoch", "global_step", "hyper_parameters", "loops", "optimizer_states", "regfw",
                                "state_dict"]
    assert content_digest(saved, record["covers"])[0] == record["sha256"]  # the tuple came back a tuple, alike
    edits = {
        "a dropout rate": lambda c: c["hyper_parameters"]["regularizers"]["dropout"].update(hidden=0.9),
        "the loop state": lambda c: c["loops"]["fit_loop"]["epoch_progress"]["current"].update(completed=5),
        "the epoch": lambda c: c.update(epoch=2),
        "an optimizer setting": lambda c: c["optimizer_states"][0]["param_groups"][0].update(lr=0.02),
        "the regfw version": lambda c: c["regfw"].update(version="9.9"),
        "a saved rate": lambda c: c["regfw"]["rates"].update(a=0.30000000000000004),  # the last bit of a float
        "a weight": lambda c: c["state_dict"]["w"].view(-1)[0].add_(1e-6),
        "an int made a float": lambda c: c.update(global_step=7.0),
    }
    for what, edit in edits.items():
        edited = safe_load(path)
        edit(edited)
        assert content_digest(edited, record["covers"])[0] != record["sha256"], what


def test_a_regularized_module_seals_its_checkpoints_in_any_trainer(tmp_path):
    """A plain Trainer (Lightning's own checkpoint IO): the module's hook writes the digest."""
    from regfw.train.module import RegularizedModule

    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    module = RegularizedModule(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)),
                               regularizers={"dropout": {"hidden": 0.3}}, example_input=x[:2])
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path), accelerator="cpu")
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=16))
    path = tmp_path / "plain.ckpt"
    trainer.save_checkpoint(path)
    ckpt = read_checkpoint(path)  # verified: no error, no flag
    assert "state_dict" in ckpt[INTEGRITY_KEY]["covers"] and "hyper_parameters" in ckpt[INTEGRITY_KEY]["covers"]


# -- accepting knowingly ---------------------------------------------------------------------------


def _notices(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("regfw: notice:")]


def test_resume_without_a_digest_is_refused_then_accepted_with_one_notice(run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ckpt = str(run / "nodigest.ckpt")
    argv = ["fit", str(run / "c.yaml"), "--resume", ckpt, "trainer.max_epochs=2", "--run-dir", "r"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"regfw fit: error: checkpoint '{ckpt}' has no integrity digest (the digest was removed, or "
                   f"another program wrote the file): it is not loaded unverified. Use a checkpoint written by "
                   f"`regfw fit`, or, if you trust this file, pass --accept-unverified (accept_unverified=True in "
                   f"Python).")
    assert not (tmp_path / "r").exists()
    assert main([*argv, "--accept-unverified"]) == 0
    assert _notices(capsys.readouterr().err) == [
        f"regfw: notice: checkpoint '{ckpt}' has no integrity digest (the digest was removed, or another program "
        f"wrote the file); loaded unverified, as accepted."]
    assert read_checkpoint(tmp_path / "r" / "checkpoints" / "last.ckpt")["epoch"] == 1  # it trained on, sealed again


def test_an_edited_dropout_rate_is_refused_by_rank_and_sampled_only_when_accepted(run, capsys):
    ckpt = str(run / "rate09.ckpt")
    assert main(["rank", str(run / "c.yaml"), ckpt, "--k", "3", "--samples", "2"]) == 2
    assert "rate09.ckpt' no longer matches the SHA-256 digest" in capsys.readouterr().err
    assert main(["rank", str(run / "c.yaml"), ckpt, "--k", "3", "--samples", "2", "--accept-unverified"]) == 0
    captured = capsys.readouterr()
    assert len(_notices(captured.err)) == 1 and "loaded unverified, as accepted" in captured.err
    from regfw.cli.rank import load_module

    with accepting(unverified=True):
        module = load_module(ckpt)
    assert 0.9 in {m.p for _, m in stochastic_modules(module)}  # what was accepted is what is sampled
    with pytest.raises(RunError, match="no longer matches"):
        load_module(ckpt)  # outside the flag's command: refused again


def test_another_regfw_version_is_named_and_accepted_with_its_own_flag(run, tmp_path, capsys):
    ckpt = str(run / "oldversion.ckpt")
    out = tmp_path / "p.csv"
    argv = ["predict", str(run / "c.yaml"), ckpt, "--out", str(out)]
    assert main([*argv, "--accept-unverified"]) == 2
    assert (f"checkpoint '{ckpt}' was written by regfw 0.0.1, this is regfw {__version__}"
            in capsys.readouterr().err)
    assert not out.exists()
    assert main([*argv, "--accept-version"]) == 0
    assert _notices(capsys.readouterr().err) == [
        f"regfw: notice: checkpoint '{ckpt}' was written by regfw 0.0.1; loaded with regfw {__version__}, as "
        f"accepted."]
    assert out.is_file()


def test_the_keywords_override_the_commands_acceptance(run):
    ckpt = run / "nodigest.ckpt"
    assert read_checkpoint(ckpt, accept_unverified=True)["epoch"] == 0
    with accepting(unverified=True), pytest.raises(RunError, match="has no integrity digest"):
        read_checkpoint(ckpt, accept_unverified=False)


# -- what an unreadable file is --------------------------------------------------------------------


def test_random_bytes_a_damaged_file_and_python_objects_are_told_apart(run, tmp_path):
    random = tmp_path / "random.ckpt"
    random.write_bytes(bytes((i * 131 + 7) % 256 for i in range(2048)))
    with pytest.raises(RunError) as err:
        read_checkpoint(random)
    assert "is not a torch checkpoint (it starts with" in str(err.value)
    assert "Python objects" not in str(err.value) and "weights_only" not in str(err.value)

    cut = tmp_path / "cut.ckpt"
    data = (run / "run" / "checkpoints" / "last.ckpt").read_bytes()
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(RunError, match=r"cut.ckpt' is corrupt or truncated and cannot be read \("):
        read_checkpoint(cut)

    objects = tmp_path / "objects.ckpt"
    torch.save({"state_dict": {}, "when": datetime.date(2020, 1, 1)}, objects)
    with pytest.raises(RunError, match=r"objects.ckpt' holds Python objects other than tensors and plain data "
                                       r"\(datetime.date\)"):
        read_checkpoint(objects)


# -- a LightningModule of one's own, trained with Regularize ------------------------------------------


class MyClassifier(pl.LightningModule):
    """A user's own module: its own step, optimizer and hyperparameters; no regfw in it."""

    def __init__(self, hidden: int = 32, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(12, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 3))
        self.example_input_array = torch.zeros(2, 12)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 12, generator=g)
    return DataLoader(TensorDataset(x, x[:, :3].argmax(-1)), batch_size=32)


def _trainer(tmp_path: Path, epochs: int, callbacks: list) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=callbacks)


@pytest.fixture(scope="module")
def regularized(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("own")
    torch.manual_seed(0)
    module = MyClassifier()
    saver = ModelCheckpoint(dirpath=str(tmp), filename="own", save_last=False)
    _trainer(tmp, 1, [Regularize({"dropout": {"hidden": 0.3}}), saver]).fit(module, _data())
    return tmp / "own.ckpt", module


def test_a_plain_load_from_checkpoint_fails_naming_load_regularized(regularized):
    path, _ = regularized
    with pytest.raises(RuntimeError) as err:
        MyClassifier.load_from_checkpoint(path)
    assert "Unexpected key(s) in state_dict" in str(err.value)
    assert '"__regfw__: trained with regfw.Regularize; load with regfw.load_regularized(cls, path)"' in str(err.value)


def test_load_regularized_restores_the_regularizers_and_the_weights(regularized):
    path, trained = regularized
    module = load_regularized(MyClassifier, path)
    rates = sorted((name, m.p) for name, m in stochastic_modules(module))
    assert rates == sorted((name, m.p) for name, m in stochastic_modules(trained))  # MC dropout has them to sample
    assert 0.3 in dict(rates).values()
    state = module.state_dict()
    assert LOAD_MARK not in state
    assert state.keys() == trained.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in trained.state_dict().items())


def test_load_regularized_verifies_the_checkpoint(regularized, tmp_path, capsys):
    path, _ = regularized
    ckpt = torch.load(path, weights_only=False)
    ckpt["regfw"]["rates"] = {name: 0.9 for name in ckpt["regfw"]["rates"]}
    edited = tmp_path / "edited.ckpt"
    torch.save(ckpt, edited)
    with pytest.raises(RunError, match=r"edited.ckpt' no longer matches the SHA-256 digest .* pass "
                                       r"--accept-unverified \(accept_unverified=True in Python\)"):
        load_regularized(MyClassifier, edited)
    module = load_regularized(MyClassifier, edited, accept_unverified=True)
    assert {m.p for _, m in stochastic_modules(module)} == {0.9}
    assert "loaded unverified, as accepted" in capsys.readouterr().err


def test_a_trainer_with_the_callback_resumes_the_marked_checkpoint(regularized, tmp_path):
    path, _ = regularized
    module = MyClassifier()
    trainer = _trainer(tmp_path, 2, [Regularize({"dropout": {"hidden": 0.3}})])
    trainer.fit(module, _data(), ckpt_path=str(path))  # the marker is dropped before the strict load
    assert trainer.current_epoch == 2 and stochastic_modules(module)
    assert "on_load_checkpoint" not in module.__dict__  # unwrapped at teardown


def test_load_regularized_reads_data_only_and_names_what_a_file_is(tmp_path):
    random = tmp_path / "random.ckpt"
    random.write_bytes(bytes((i * 131 + 7) % 256 for i in range(2048)))
    with pytest.raises(RunError, match=r"random.ckpt' is not a torch checkpoint \(it starts with"):
        load_regularized(MyClassifier, random)
    objects = tmp_path / "objects.ckpt"
    torch.save({"state_dict": {}, "when": datetime.date(2020, 1, 1)}, objects)
    with pytest.raises(RunError, match=r"objects.ckpt' holds Python objects other than tensors"):
        load_regularized(MyClassifier, objects)
    with pytest.raises(RunError, match=r"nope.ckpt' does not exist or is not a file"):
        load_regularized(MyClassifier, tmp_path / "nope.ckpt")
