"""Bad checkpoints and mismatched resumes: each is an error naming the file and what is wrong, and a
failed resume writes nothing into the run directory. Checkpoints are written atomically."""
from __future__ import annotations

import hashlib
import pickle
import shutil
import textwrap
from pathlib import Path

import pytest
import torch

from regfw.cli.main import main
from regfw.config.schema import load_config
from regfw.errors import ConfigError, RunError
from regfw.run.checkpoints import INTEGRITY_KEY, AtomicCheckpointIO, read_checkpoint, save_atomic
from regfw.run.job import fit, load_resume_config

CONFIG = """
seed: 0
data: {name: digits, batch_size: 64, train_fraction: 0.2}
model: {name: mlp, init_args: {hidden: [16]}}
optimizer: {name: adam, lr: 0.01}
regularizers: {dropout: {hidden: 0.3}}
uncertainty: {enabled: false}
trainer: {max_epochs: 1, enable_progress_bar: false, enable_model_summary: false, logger: false}
"""


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """A finished one-epoch run: ``(config path, run directory)``."""
    root = tmp_path_factory.mktemp("faults")
    (root / "cfg.yaml").write_text(CONFIG)
    result = fit(load_config(root / "cfg.yaml"), run_dir=str(root / "good"), quiet=True)
    return root / "cfg.yaml", result.run_dir


def snapshot(directory: Path) -> dict:
    """Every file under ``directory`` with its size, modification time and SHA-256."""
    return {str(p.relative_to(directory)):
            (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(directory.rglob("*")) if p.is_file()}


def copy_run(good_run, tmp_path) -> tuple[Path, Path]:
    cfg, run = good_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return cfg, copy


def resume_error(cfg: Path, run: Path, overrides=(), checkpoint=None) -> str:
    """The RunError of resuming ``run``, checking that the attempt left ``run`` untouched."""
    before = snapshot(run)
    with pytest.raises(RunError) as err:
        fit(load_config(cfg, overrides), run_dir=str(run), resume=checkpoint or True)
    assert snapshot(run) == before
    return str(err.value)


# -- damaged files ----------------------------------------------------------------------------


def test_truncated_checkpoint_is_named_with_the_other_checkpoints(good_run, tmp_path):
    cfg, run = copy_run(good_run, tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    text = resume_error(cfg, run)
    assert text.startswith(f"checkpoint '{last}' is corrupt or truncated and cannot be read (")
    assert "Other checkpoints there: epoch=000.ckpt; resume from one with `--resume PATH`" in text


def test_changed_bytes_inside_a_tensor_fail_the_digest(good_run, tmp_path):
    cfg, run = copy_run(good_run, tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    weight = read_checkpoint(last)["state_dict"]["model.head.weight"]
    data = bytearray(last.read_bytes())
    at = data.find(weight.numpy().tobytes())
    assert at > 0
    data[at + 5] ^= 0x40  # one bit of one float: torch.load alone would not notice
    last.write_bytes(bytes(data))
    assert not torch.equal(torch.load(last, weights_only=False)["state_dict"]["model.head.weight"], weight)
    text = resume_error(cfg, run)
    assert text.startswith(f"checkpoint '{last}' no longer matches the SHA-256 digest recorded when it was written "
                           f"(its weights, hyperparameters or loop state were edited, or the file is damaged): it is "
                           f"not loaded unverified.")
    assert text.endswith("pass --accept-unverified (accept_unverified=True in Python).")


def test_empty_foreign_and_non_regfw_files(good_run, tmp_path):
    cfg, run = copy_run(good_run, tmp_path)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    assert "is empty (0 bytes): it was never completely written" in resume_error(cfg, run, checkpoint=str(empty))
    weights = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(3)}, weights)
    assert resume_error(cfg, run, checkpoint=str(weights)) == (
        f"checkpoint '{weights}' is not a Lightning checkpoint (it holds dict without a state_dict); "
        f"resume needs a .ckpt file written by `regfw fit`.")
    plain = read_checkpoint(run / "checkpoints" / "last.ckpt")
    del plain["regfw"]
    foreign = tmp_path / "plain-lightning.ckpt"
    torch.save(plain, foreign)
    assert "was not written by regfw (it has no 'regfw' metadata" in resume_error(cfg, run, checkpoint=str(foreign))
    missing = tmp_path / "nope.ckpt"
    assert resume_error(cfg, run, checkpoint=str(missing)).startswith(f"checkpoint '{missing}' does not exist.")


# -- checkpoints of something else --------------------------------------------------------------


@pytest.mark.parametrize("overrides, expected", [
    (["model.init_args.hidden=[24]"],
     "model.init_args.hidden is [16] in the checkpoint but [24] in config"),
    (["model.init_args.hidden=[16, 4]"], "model.init_args.hidden is [16] in the checkpoint but [16, 4] in config"),
    (["regularizers.dropout.hidden=0.5"],
     "regularizers.dropout.hidden is 0.3 in the checkpoint but 0.5 in config"),
    (["regularizers.dropout=false"], "in the checkpoint but not in config"),
    (["regularizers.l1={}"], "regularizers.l1 is not in the checkpoint but is {"),
    (["optimizer.lr=0.1"], "optimizer.lr is 0.01 in the checkpoint but 0.1 in config"),
    (["data.train_fraction=0.5"], "data (number of training examples) is 270 in the checkpoint but 674 in config"),
])
def test_a_checkpoint_of_another_model_or_regularizer_set_names_each_difference(good_run, overrides, expected):
    cfg, run = good_run
    text = resume_error(cfg, run, overrides)
    assert text.startswith(f"checkpoint '{run / 'checkpoints' / 'last.ckpt'}' does not match config '{cfg}': ")
    assert expected in text
    assert text.endswith("Resume with the settings the run was started with (its config.yaml), or start a new "
                         "run without --resume.")


def test_trainer_and_run_sections_may_change_on_resume(good_run, tmp_path):
    cfg, run = copy_run(good_run, tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    # overrides may follow the checkpoint on the command line
    assert main(["fit", str(cfg), "--resume", str(last), "trainer.max_epochs=2", "run.on_nan=skip"]) == 0
    assert read_checkpoint(last)["epoch"] == 1
    # the copied run rewrote its own last.ckpt (no last-v1.ckpt beside a stale one)
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("last") and p.name != "last.ckpt"]
    assert sorted(p.name for p in run.iterdir()) == [".regfw-lock", ".regfw-run", "checkpoints", "config.yaml",
                                                     "plan.txt", "resume-1.yaml"]


PLUGIN = '''
from dataclasses import dataclass
import torch
import regfw
from regfw.extend.regularizer import Regularizer

@dataclass
class Cfg:
    strength: float = 1e-4

class Shrink(Regularizer):
    name = "shrink"
    Config = Cfg

    def penalty(self, model):
        return self.config.strength * sum((p ** 2).sum() for p in model.parameters())

@regfw.hookimpl
def regfw_register_regularizers(register):
    register(Shrink)
'''


def test_a_checkpoint_whose_plugin_is_gone_names_the_plugin_and_its_distribution(tmp_path, monkeypatch, capsys):
    from regfw.registry.discovery import register_plugin, unregister_plugin

    (tmp_path / "shrink_plugin.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    import shrink_plugin

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CONFIG + "run: {dir: runs}\n")
    register_plugin(shrink_plugin, "shrink", distribution="regfw-shrink", version="0.3")
    try:
        run = fit(load_config(cfg, ["regularizers.shrink={}"]), run_dir=str(tmp_path / "r"), quiet=True).run_dir
    finally:
        unregister_plugin("shrink")
    before = snapshot(run)
    with pytest.raises(RunError) as err:
        load_resume_config(str(cfg), ["regularizers.shrink={}"], None, str(run))
    assert str(err.value).startswith(
        f"cannot resume from checkpoint '{run / 'checkpoints' / 'last.ckpt'}': it was trained with regularizer "
        f"'shrink' (from plugin 'shrink' of distribution regfw-shrink 0.3), which no installed plugin provides "
        f"(regularizers.shrink: unknown regularizer 'shrink'.")
    # the same through the command line; and with the regularizer dropped from the config too
    assert main(["fit", str(cfg), "regularizers.shrink={}", "--run-dir", str(run), "--resume"]) == 2
    assert "which no installed plugin provides" in capsys.readouterr().err
    text = resume_error(cfg, run)
    assert ("the checkpoint's regularizer 'shrink' (from plugin 'shrink' of distribution regfw-shrink 0.3) is "
            "provided by no installed plugin; regularizers.shrink is {'strength': 0.0001} in the checkpoint but "
            "not in config") in text
    assert snapshot(run) == before


# -- writing -------------------------------------------------------------------------------------


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "last.ckpt"
    save_atomic({"step": 1, "w": torch.ones(3)}, path)
    good = path.read_bytes()
    # a local lambda does not pickle (AttributeError or PicklingError, by Python version)
    with pytest.raises((AttributeError, pickle.PicklingError), match="Can't pickle"):
        save_atomic({"step": 2, "w": torch.ones(1000), "bad": lambda: None}, path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_checkpoint_io_records_the_digest_of_every_tensor(tmp_path):
    path = tmp_path / "c.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"a": torch.arange(4.0), "b": torch.zeros(0)},
                                          "optimizer_states": [{"state": {0: {"m": torch.ones(2)}}}]}, path)
    saved = torch.load(path, weights_only=False)
    assert saved[INTEGRITY_KEY]["tensors"] == 3 and len(saved[INTEGRITY_KEY]["sha256"]) == 64


def test_a_model_that_does_not_fit_the_data_is_a_config_error_naming_the_shapes(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CONFIG)
    with pytest.raises(ConfigError) as err:
        fit(load_config(cfg, ["model.init_args.in_features=32"]), run_dir=str(tmp_path / "r"))
    assert str(err.value).startswith(
        "model: building 'mlp' with init_args {'hidden': [16], 'in_features': 32, 'num_outputs': 10} on the data's "
        "example batch (shape [2, 64], float32) failed: RuntimeError: mat1 and mat2 shapes cannot be multiplied")
    assert not (tmp_path / "r").exists()  # checked before the run directory is made
