"""The generated bad-input suite: every input a user can get wrong, through the CLI's ``main()``.

For each case: exit status 2, exactly one line on stderr, no traceback, the key or file at fault
named in it, and no run directory left behind (nor any file of a given one changed). The cases
are generated from the config schema (every field with values of the wrong type or out of range,
every section with a misspelled key), the trainer section's arguments, files, overrides, command
lines, run directories and checkpoints. They run in-process on tiny data, so the suite is fast;
``test_a_few_cases_as_real_processes`` runs some as real ``regfw`` processes too.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
from badinput_cases import area_cases

from regfw.cli.main import main
from regfw.config.schema import DataConfig, ModelConfig, OptimizerConfig, RunConfig, UncertaintyConfig

GOOD = """\
data: {train_fraction: 0.1, batch_size: 64}
model: {init_args: {hidden: [8]}}
regularizers: {dropout: {hidden: 0.2}}
uncertainty: {samples: 3, plots: false}
trainer: {max_epochs: 1, enable_progress_bar: false, enable_model_summary: false}
"""

# -- generated from the schema ------------------------------------------------------------------

_WRONG = {
    int: ["three", "1.5", "true", "[1]"],
    float: ["fast", "true", "[1]", ".nan"],
    bool: ["'false'", "3"],
    str: ["[1, 2]", "{a: 1}"],
}


def _schema_cases() -> list[tuple[list[str], str]]:
    cases = []
    for section, cls in (("data", DataConfig), ("model", ModelConfig), ("optimizer", OptimizerConfig),
                         ("uncertainty", UncertaintyConfig), ("run", RunConfig)):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            tp = hints[f.name]
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            base = args[0] if typing.get_origin(tp) is typing.Union and len(args) == 1 else tp
            if typing.get_origin(base) is typing.Literal:
                cases.append(([f"{key}=nope"], key))
                continue
            for value in _WRONG.get(base, []):
                cases.append(([f"{key}={value}"], key))
            spec = f.metadata.get("range")
            if spec is not None:
                low = spec[0]
                cases.append(([f"{key}={low - 1}"], key))
                if spec[1] is not None:
                    cases.append(([f"{key}={spec[1] + 1}"], key))
        cases.append(([f"{section}.{list(hints)[0]}x=1"], f"{section}.{list(hints)[0]}x"))  # misspelled key
    return cases


_TRAINER = {
    "max_epochs": ["0", "-1", "null", "true", "three", "'2'", "1.5"],
    "max_steps": ["0", "-5", "many"],
    "enable_progress_bar": ["'false'", "1"],
    "enable_model_summary": ["'no'"],
    "deterministic": ["'yes'"],
    "limit_train_batches": ["0", "-1", "1.5", "lots"],
    "limit_val_batches": ["-1", "2.5"],
    "val_check_interval": ["0", "-0.5"],
    "check_val_every_n_epoch": ["0", "'1'"],
    "gradient_clip_val": ["-1", "big"],
    "gradient_clip_algorithm": ["norms"],
    "accumulate_grad_batches": ["0", "1.5"],
    "log_every_n_steps": ["0", "'10'"],
    "num_sanity_val_steps": ["-2"],
    "precision": ["17", "half"],
    "accelerator": ["gpus"],
    "devices": ["0", "many", "[-1]"],
    "num_nodes": ["0"],
    "fast_dev_run": ["-1"],
    "overfit_batches": ["-1", "1.5"],
    "logger": ["csvv", "3"],
    "callbacks": ["[]"],
    "default_root_dir": ["somewhere"],
    "enable_checkpointing": ["false"],
    "max_epochss": ["3"],
}


def _trainer_cases() -> list[tuple[list[str], str]]:
    return [([f"trainer.{k}={v}"], f"trainer.{k}") for k, values in _TRAINER.items() for v in values]


_VALUES = [
    (["seed=-1"], "seed"), (["seed=1099511627776"], "seed"), (["seed=x"], "seed"), (["seed=1.5"], "seed"),
    (["optimizer.lr=1e300"], "optimizer.lr"), (["optimizer.momentum=0.9"], "optimizer.momentum"),
    (["optimizer.name=adam", "optimizer.momentum=0.5"], "optimizer.momentum"),
    (["uncertainty.samples=10000000"], "uncertainty.samples"), (["uncertainty.samples=1"], "uncertainty.samples"),
    (["uncertainty.threshold=-1"], "uncertainty.threshold"), (["uncertainty.max_batches=0"], "uncertainty.max_batches"),
    (["run.name=../../escaped"], "run.name"), (["run.name=a/b"], "run.name"), (["run.name=.."], "run.name"),
    (["model.init_args.hidden=[0]"], "model.init_args.hidden"),
    (["model.init_args.hidden=[8, -3]"], "model.init_args.hidden"),
    (["model.init_args.hidden=[wide]"], "model.init_args.hidden"),
    (["model.loss=mse"], "model.loss"), (["model.loss=gaussian_nll"], "model.loss"),
    (["data.name=diabetes", "model.loss=cross_entropy"], "model.loss"),
    (["data.init_args={foo: 1}"], "data"), (["model.init_args={foo: 1}"], "model"),
    (["model.init_args.in_features=3"], "model"),
    (["model.class_path=collections.OrderedDict"], "model.class_path"),
    (["model.class_path=os.sep"], "model.class_path"), (["model.class_path=nope.Net"], "model.class_path"),
    (["model.class_path=Net"], "model.class_path"), (["model.class_path=torch.nn.NoSuchNet"], "model.class_path"),
    (["data.class_path=torch.nn.Linear"], "data.class_path"), (["data.class_path=os.sep"], "data.class_path"),
    (["data.class_path=nope.Data"], "data.class_path"),
    (["regularizers.dropoutt={}"], "dropoutt"), (["regularizers.dropout.hidden=2"], "regularizers.dropout.hidden"),
    (["regularizers.dropout.hiddn=0.1"], "regularizers.dropout.hiddn"), (["regularizers=[1]"], "regularizers"),
    (["regularizers.dropout=3"], "regularizers.dropout"), (["trainer=3"], "trainer"), (["data=3"], "data"),
    (["model=[1]"], "model"), (["seeds=1"], "seeds"),
]

# models of the user's that cannot work: an int, a factory returning a string, an __init__ that raises,
# a forward that returns a tuple (written to badmodels.py by _all_cases)
BAD_MODELS = """
from torch import nn

INT = 3

def to_string(**kwargs):
    return "not a module"

class Raising(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        raise RuntimeError("cannot build me")

class Pair(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.body = nn.Linear(64, 10)

    def forward(self, x):
        return self.body(x), x
"""
_MODELS = [
    (["model.class_path=badmodels.INT"], "model.class_path"), (["model.class_path=badmodels.to_string"], "model"),
    (["model.class_path=badmodels.Raising"], "cannot build me"), (["model.class_path=badmodels.Pair"], "tuple"),
]

_OVERRIDES = [
    (["seed=[1,2"], "seed=[1,2"), ([".seed=1"], ".seed=1"), (["=1"], "=1"), (["seed."], "seed."),
    (["trainer..max_epochs=2"], "trainer..max_epochs"), (["seed={a"], "seed={a"),
]


# -- the files, command lines, run directories and checkpoints ------------------------------------

def _file_cases(tmp: Path) -> list[tuple[list[str], str]]:
    (tmp / "adir").mkdir()
    os.mkfifo(tmp / "fifo")
    (tmp / "empty.yaml").write_text("")
    (tmp / "blank.yaml").write_text("\n  \n")
    (tmp / "broken.yaml").write_text("data: {train_fraction: 0.1\nmodel: x\n")
    (tmp / "tabs.yaml").write_text("data:\n\tname: digits\n")
    (tmp / "list.yaml").write_text("- 1\n- 2\n")
    (tmp / "scalar.yaml").write_text("hello\n")
    (tmp / "interp.yaml").write_text(GOOD + "seed: ${nope}\n")
    (tmp / "section.yaml").write_text(GOOD + "trainr: {max_epochs: 2}\n")
    return [([str(tmp / name)], name) for name in
            ("missing.yaml", "adir", "fifo", "empty.yaml", "blank.yaml", "broken.yaml", "tabs.yaml", "list.yaml",
             "scalar.yaml", "interp.yaml", "section.yaml")]


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """A finished one-epoch run and damaged copies of its checkpoint."""
    root = tmp_path_factory.mktemp("good")
    (root / "c.yaml").write_text(GOOD)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["fit", "c.yaml", "--run-dir", "run"]) == 0
    finally:
        os.chdir(cwd)
    return root


class _Payload:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def _checkpoint_cases(root: Path, tmp: Path) -> list[tuple[list[str], str]]:
    from regfw.run.checkpoints import AtomicCheckpointIO, safe_load

    last = root / "run" / "checkpoints" / "last.ckpt"
    good = safe_load(last)
    made = {}

    def variant(name: str, change) -> None:
        ckpt = safe_load(last)
        change(ckpt)
        AtomicCheckpointIO().save_checkpoint({k: v for k, v in ckpt.items() if k != "regfw_integrity"}, tmp / name)
        made[name] = tmp / name

    def nan(c):
        key = next(iter(c["state_dict"]))
        c["state_dict"][key] = c["state_dict"][key] * float("nan")

    variant("nan.ckpt", nan)
    variant("epoch99.ckpt", lambda c: c.update(epoch=99))
    variant("step-5.ckpt", lambda c: c.update(global_step=-5))
    variant("noloops.ckpt", lambda c: c.pop("loops"))
    variant("strregs.ckpt", lambda c: c["hyper_parameters"].update(regularizers="gaussian"))
    nan_raw = safe_load(last)
    nan(nan_raw)
    nan_raw.pop("regfw_integrity")
    torch.save(nan_raw, tmp / "nan-nodigest.ckpt")
    made["nan-nodigest.ckpt"] = tmp / "nan-nodigest.ckpt"
    torch.save({"state_dict": {}, "x": _Payload(str(tmp / "pwned"))}, tmp / "payload.ckpt")
    (tmp / "empty.ckpt").write_bytes(b"")
    (tmp / "text.ckpt").write_text("not a checkpoint")
    (tmp / "half.ckpt").write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    torch.save({"weight": torch.zeros(2)}, tmp / "weights.pt")
    (tmp / "ckdir").mkdir()
    assert good["epoch"] == 0
    names = [*made, "payload.ckpt", "empty.ckpt", "text.ckpt", "half.ckpt", "weights.pt", "ckdir", "nope.ckpt"]
    cases = []
    for name in names:
        cases.append((["fit", str(root / "c.yaml"), "--resume", str(tmp / name), "trainer.max_epochs=3"], name))
    for name in ("nan.ckpt", "nan-nodigest.ckpt", "payload.ckpt", "empty.ckpt", "text.ckpt", "half.ckpt",
                 "weights.pt", "nope.ckpt", "strregs.ckpt"):
        cases.append((["rank", str(root / "c.yaml"), str(tmp / name)], name))
    # the run's own last.ckpt has finished its one epoch: resuming without more epochs trains nothing
    cases.append((["fit", str(root / "c.yaml"), "--resume", str(last)], "last.ckpt"))
    return cases


def _cli_cases(tmp: Path) -> list[tuple[list[str], str]]:
    (tmp / "user").mkdir()
    (tmp / "user" / "config.yaml").write_text("mine\n")
    (tmp / "user" / "thesis.tex").write_text("mine\n")
    (tmp / "afile").write_text("x")
    cfg = str(tmp / "c.yaml")
    return [
        (["fitt", cfg], "fitt"), (["fit"], "config"), (["fit", cfg, "--bogus"], "--bogus"),
        (["fit", cfg, "trainer.max_epochs"], "trainer.max_epochs"),
        (["fit", cfg, "--run-dir", str(tmp / "user")], "user"),
        (["fit", cfg, "--run-dir", str(tmp / "user"), "--force"], "user"),
        (["fit", cfg, "--run-dir", str(tmp / "afile")], "afile"),
        (["fit", cfg, "--force"], "--force"), (["fit", cfg, "--run-dir", ""], "--run-dir"),
        (["fit", cfg, "--resume", "--force", "--run-dir", str(tmp / "user")], "--force"),
        (["fit", cfg, "--resume"], "--resume"),
        (["fit", cfg, "--run-dir", str(tmp / "nowhere"), "--resume"], "nowhere"),
        (["init", str(tmp / "adir2"), "--force"], "adir2"), (["init", str(tmp / "afile" / "x.yaml")], "afile"),
        (["init", str(tmp / "c.yaml")], "c.yaml"), (["rank", cfg, str(tmp / "none.ckpt"), "--k", "x"], "--k"),
        (["rank", cfg, str(tmp / "none.ckpt"), "--acquisition", "bold"], "bold"),
        (["new-plugin", "Bad-Name", "--dir", str(tmp)], "Bad-Name"),
    ]


def _all_cases(root: Path, tmp: Path) -> list[tuple[list[str], str]]:
    cfg = str(tmp / "c.yaml")
    (tmp / "c.yaml").write_text(GOOD)
    (tmp / "adir2").mkdir()
    (tmp / "badmodels.py").write_text(BAD_MODELS)
    cases = [(["fit", cfg, *o], key) for o, key in
             _schema_cases() + _trainer_cases() + _VALUES + _MODELS + _OVERRIDES]
    cases += [(["fit", *f], key) for f, key in _file_cases(tmp)]
    cases += [(["plan", *f], key) for f, key in _file_cases_plan(tmp)]
    cases += _checkpoint_cases(root, tmp) + _cli_cases(tmp)
    cases += area_cases(root, tmp)
    return cases


def _file_cases_plan(tmp: Path) -> list[tuple[list[str], str]]:
    return [([str(tmp / name)], name) for name in ("missing.yaml", "adir", "empty.yaml", "broken.yaml")]


def _snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and not p.is_fifo() and "__pycache__" not in p.parts}


def test_every_bad_input_is_one_named_line_and_exit_2(good_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # badmodels.py
    cases = _all_cases(good_run, tmp_path)
    assert len(cases) >= 150
    before = _snapshot(tmp_path), _snapshot(good_run)
    unclear = []
    for argv, named in cases:
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's --help and version exit; nothing else may
            code = exc.code
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        ok = (code == 2 and len(lines) == 1 and "Traceback" not in err and named in lines[0]
              and not (tmp_path / "runs").exists() and not (good_run / "runs").exists())
        if not ok:
            unclear.append((argv, code, err.strip()[-400:]))
    assert not (tmp_path / "pwned").exists()  # the payload never ran
    assert (_snapshot(tmp_path), _snapshot(good_run)) == before  # nothing written, nothing changed
    report = "\n".join(f"{' '.join(a)} -> {c}: {e}" for a, c, e in unclear)
    print(f"bad-input suite: {len(cases)} cases tried, {len(cases) - len(unclear)} clear")
    assert not unclear, f"{len(unclear)} of {len(cases)} cases unclear:\n{report}"


def test_a_few_cases_as_real_processes(tmp_path, run_cli):
    (tmp_path / "c.yaml").write_text(GOOD)
    for args, named in ((["fit", "c.yaml", "trainer.max_epochs=three"], "trainer.max_epochs"),
                        (["fit", "c.yaml", "seed=[1,2"], "seed=[1,2"),
                        (["plan", "missing.yaml"], "missing.yaml")):
        result = run_cli(*args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and named in lines[0], result.stderr
    assert not (tmp_path / "runs").exists()
    # a closed stdout (`regfw plugins | head -1`) is not an error with a traceback
    proc = subprocess.run(f"{sys.executable} -m regfw plugins | head -1", shell=True, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.count("\n") == 1 and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr
