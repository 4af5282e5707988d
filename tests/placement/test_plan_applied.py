"""The plan is what is applied: the rows ``regfw plan`` prints are exactly the changes ``regfw fit`` makes.

For every built-in regularizer (taken from the registry), the template plugin and a plugin that
overrides only ``plan()``: ``regfw plan CONFIG`` is run and its table parsed, then ``regfw fit
CONFIG`` is run through the CLI with a probe regularizer selected alongside. The probe is a real
plugin (a ``*.dist-info`` entry point on ``sys.path``): its ``plan`` records the model's modules
before anything is applied, and its Lightning callback records the modules and their rates when
training starts and when the fit ends. Every planned insertion must be there with its rate, every
``set`` row's module must have the planned rate, every ``wrap`` row's layer must have gained a
module, and nothing else may have been added. Plugins whose rows cannot be carried out are
refused by ``regfw plan`` and ``regfw fit`` alike, naming the class and the method.
"""
from __future__ import annotations

import json
import re
import sys
import textwrap
import types
from pathlib import Path

import pytest
from plugin_dists import distribution

import regfw
from regfw.cli.main import main
from regfw.errors import PluginError
from regfw.extend.regularizer import Regularizer
from regfw.placement.api import injected_name
from regfw.registry.discovery import PluginWarning, register_plugin, reset_plugin_manager, unregister_plugin
from regfw.registry.regularizers import get_registry

PROBE = """
import json
from dataclasses import dataclass

import torch

import regfw
from regfw import Regularizer


def rate(module):
    for attr in ("p", "drop_prob", "std"):
        value = getattr(module, attr, None)
        if torch.is_tensor(value) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    attention = module if isinstance(module, torch.nn.MultiheadAttention) else getattr(module, "self_attn", None)
    return float(attention.dropout) if isinstance(attention, torch.nn.MultiheadAttention) else None


def modules(model):
    return {path: [type(m).__name__, rate(m)] for path, m in model.named_modules()}


@dataclass
class ProbeConfig:
    out: str = "probe.json"


class Probe(Regularizer):
    name = "probe_modules"
    Config = ProbeConfig

    def plan(self, model, ctx):
        self.record = {"plain": modules(model)}  # before any regularizer applies its rows
        return []

    def callbacks(self):
        import pytorch_lightning as pl

        probe = self

        class Record(pl.Callback):
            def on_train_start(self, trainer, pl_module):
                probe.record["start"] = modules(pl_module.model)

            def on_fit_end(self, trainer, pl_module):
                probe.record["end"] = modules(pl_module.model)
                with open(probe.config.out, "w") as f:
                    json.dump(probe.record, f)

        return [Record()]


@regfw.hookimpl
def regfw_register_regularizers(register):
    register(Probe)
"""

#: A plugin that writes its own ``plan()`` (a module after every ``nn.ReLU``) and keeps the inherited
#: ``apply()``: the rows it plans must be inserted.
PLAN_ONLY = """
from dataclasses import dataclass

import torch

import regfw
from regfw import InjectingRegularizer, PlanItem


@dataclass
class ReluDropConfig:
    rate: float = 0.2


class ReluDrop(InjectingRegularizer):
    name = "relu_drop"
    Config = ReluDropConfig

    def plan(self, model, ctx):
        return [PlanItem(self.name, path, "hidden", "relu_drop", self.config.rate, "after every ReLU module",
                         action="after", anchor=path)
                for path, module in model.named_modules() if isinstance(module, torch.nn.ReLU)]

    def make_module(self, kind, rate, item):
        return torch.nn.Dropout(rate)


@regfw.hookimpl
def regfw_register_regularizers(register):
    register(ReluDrop)
"""

#: Plugins whose plan cannot be applied as printed: each is refused, by `regfw plan` too.
UNAPPLIABLE = """
import torch

import regfw
from regfw import InjectingRegularizer, PlanItem, Regularizer


def relus(model):
    return [path for path, module in model.named_modules() if isinstance(module, torch.nn.ReLU)]


class HandWrap(InjectingRegularizer):
    name = "hand_wrap"

    def plan(self, model, ctx):
        return [PlanItem(self.name, p, "hidden", "hand_wrap", 0.2, "wrap", action="wrap", anchor=p)
                for p in relus(model)]

    def make_module(self, kind, rate, item):
        return torch.nn.Dropout(rate)


class Inserter(InjectingRegularizer):
    name = "inserter"

    def plan(self, model, ctx):
        return [PlanItem(self.name, p, "hidden", "inserter", 0.2, "insert", action="insert", anchor=p)
                for p in relus(model)]

    def make_module(self, kind, rate, item):
        return torch.nn.Dropout(rate)


class HalfApply(Regularizer):
    name = "half_apply"

    def plan(self, model, ctx):
        return [PlanItem(self.name, p, "hidden", "half_apply", 0.2, "after", action="after", anchor=p)
                for p in relus(model)]

    def make_module(self, kind, rate, item):
        return torch.nn.Dropout(rate)

    def apply(self, model, items):  # written before apply_row: does the first row itself, forgets the rest
        first = items[0]
        model.get_submodule(first.anchor).add_module("regfw_half_apply", torch.nn.Dropout(first.rate))


class NoMaker(Regularizer):
    name = "no_maker"

    def plan(self, model, ctx):
        return [PlanItem(self.name, p, "hidden", "no_maker", 0.2, "after", action="after", anchor=p)
                for p in relus(model)]


class Twice(InjectingRegularizer):
    name = "twice"

    def plan(self, model, ctx):  # two dropouts after the first ReLU: only one could be inserted there
        p = relus(model)[0]
        return [PlanItem(self.name, p, "hidden", "twice", rate, "twice", action="after", anchor=p)
                for rate in (0.1, 0.2)]

    def make_module(self, kind, rate, item):
        return torch.nn.Dropout(rate)


@regfw.hookimpl
def regfw_register_regularizers(register):
    for cls in (HandWrap, Inserter, HalfApply, NoMaker, Twice):
        register(cls)
"""

#: One model with a layer of every kind, so that each built-in has something to act on: input and
#: hidden Linear layers, a residual add, an embedding, an LSTM, a Transformer layer and a conv layer.
MODELS = """
import torch
from torch import nn


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(64, 16)
        self.act = nn.ReLU()
        self.block = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
        self.embed = nn.Embedding(17, 8)
        self.rnn = nn.LSTM(8, 8, batch_first=True)
        self.encoder = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.conv_act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16 + 8 + 4, 10)

    def forward(self, x):
        h = self.act(self.inp(x))
        h = h + self.block(h)
        tokens = x[:, :8].clamp(0, 16).long()
        seq, _ = self.rnn(self.embed(tokens))
        seq = self.encoder(seq).mean(1)
        c = self.pool(self.conv_act(self.conv(x.reshape(-1, 1, 8, 8)))).flatten(1)
        return self.head(torch.cat([h, seq, c], 1))
"""

CONFIG = """\
seed: 0
data: {{name: digits, train_fraction: 0.1, batch_size: 32}}
model: {{class_path: planmodels.Mixed}}
regularizers:
  {regs}
uncertainty: {{enabled: false}}
trainer: {{max_epochs: 1, limit_train_batches: 2, limit_val_batches: 1, enable_progress_bar: false,
          enable_model_summary: false}}
"""



@pytest.fixture
def site(tmp_path, monkeypatch, fresh_plugins):
    """The probe, the test plugins, the template's generated plugin and the test model, importable."""
    from regfw.cli.new_plugin import new_plugin

    for name in OURS:  # imported by an earlier test from its own folder
        monkeypatch.delitem(sys.modules, name, raising=False)
    root = tmp_path / "site"
    root.mkdir()
    distribution(root, "regfw-probe", "probe_modules", "regfw_probe", PROBE)
    distribution(root, "regfw-relu-drop", "relu_drop", "regfw_relu_drop", PLAN_ONLY)
    distribution(root, "regfw-unappliable", "unappliable", "regfw_unappliable", UNAPPLIABLE)
    (root / "planmodels.py").write_text(MODELS)
    made = new_plugin("tmpl_noise", tmp_path / "generated")
    distribution(root, "regfw-tmpl-noise", "tmpl_noise", "regfw_tmpl_noise", None)
    monkeypatch.syspath_prepend(str(made.path))
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delenv("REGFW_LOAD_PLUGINS", raising=False)
    monkeypatch.chdir(tmp_path)
    reset_plugin_manager()
    yield tmp_path
    for name in OURS:
        sys.modules.pop(name, None)


#: The modules :func:`site` makes importable.
OURS = ("regfw_probe", "regfw_relu_drop", "regfw_unappliable", "planmodels", "regfw_tmpl_noise")


def parse_plan(out: str) -> tuple[int, list[dict]]:
    """The change count and the rows of a printed plan (``regfw.placement.plan.Plan.format``)."""
    count = int(re.search(r"(\d+) change\(s\)", out).group(1))
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("regularizer  "))
    names = set(get_registry().names()) | {s.name for s in get_registry().all_specs()}
    rows = []
    for line in lines[start + 1:]:
        cells = re.split(r"\s{2,}", line, maxsplit=6)
        if len(cells) < 6 or cells[0] not in names:
            break
        regularizer, path, kind, variant, rate, where = cells[:6]
        action, _, anchor = where.partition(" ")
        path = "" if path == "<model>" else path
        rows.append({"regularizer": regularizer, "path": path, "kind": kind, "variant": variant, "action": action,
                     "anchor": anchor or path, "rate": None if rate == "-" else float(rate)})
    return count, rows


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _close(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and abs(a - b) <= 1e-5 * max(1.0, abs(b))  # the plan prints %g


def check_applied_as_planned(tmp: Path, selection: str, capsys) -> list[dict]:
    """Run ``regfw plan`` and ``regfw fit`` on one config and compare the printed rows with the
    modules the probe saw; returns the change rows."""
    cfg = tmp / "c.yaml"
    cfg.write_text(CONFIG.format(regs=f"{selection}\n  probe_modules: {{out: {tmp / 'probe.json'}}}"))
    code, out, err = _run(["plan", str(cfg)], capsys)
    assert code == 0, err
    count, rows = parse_plan(out)
    changes = [r for r in rows if r["action"] != "note"]
    assert count == len(changes), out
    run = tmp / f"run{len(list(tmp.glob('run*')))}"
    code, _, err = _run(["fit", str(cfg), "--run-dir", str(run)], capsys)
    assert code == 0, err
    seen = json.loads((tmp / "probe.json").read_text())
    plain, start, end = seen["plain"], seen["start"], seen["end"]
    added = {p for p in end if p not in plain}
    top = {p for p in added if p.rpartition(".")[0] not in added}  # the added modules, not their children
    explained: set[str] = set()
    for row in changes:
        anchor, action, rate = row["anchor"], row["action"], row["rate"]
        if action in ("before", "after"):
            name = injected_name(row["regularizer"], action)
            path = f"{anchor}.{name}" if anchor else name
            assert path in end, f"planned {row} but {path!r} is not in the trained model"
            assert _close(start[path][1], rate), f"{path}: rate {start[path][1]} at the start, planned {rate}"
            explained.add(path)
        elif action == "set":
            assert anchor in plain, f"a set row on {anchor!r}, which the model did not have"
            assert _close(start[anchor][1], rate), f"{anchor}: rate {start[anchor][1]} at the start, planned {rate}"
        else:
            assert action == "wrap", row
            gained = {p for p in top if p.startswith(f"{anchor}.")}
            assert gained, f"planned {row} but {anchor!r} gained no module"
            if rate is not None:
                assert any(_close(start[p][1], rate) for p in gained), (row, {p: start[p] for p in gained})
            explained |= gained
    assert top == explained, f"added but not planned: {sorted(top - explained)}; planned: {changes}"
    return changes


BUILTINS = sorted(s.name for s in get_registry().all_specs() if s.builtin)


@pytest.mark.slow
@pytest.mark.parametrize("name", BUILTINS)
def test_every_builtin_applies_exactly_the_rows_regfw_plan_prints(site, name, capsys):
    selection = f"{name}: {{}}"
    code, _, err = _run(["plan", str(_write(site, selection))], capsys)
    if code == 2:  # one that acts on the layers another inserts (adaptive_dropout): with dropout beside it
        selection = f"dropout: {{}}\n  {selection}"
    changes = check_applied_as_planned(site, selection, capsys)
    if getattr(get_registry().get(name).cls, "kinds", ()):  # a layer-changing regularizer: the model has its kinds
        assert any(r["regularizer"] == name for r in changes), f"{name} planned no change on a model of every kind"


def _write(tmp: Path, selection: str) -> Path:
    cfg = tmp / "c.yaml"
    cfg.write_text(CONFIG.format(regs=selection))
    return cfg


@pytest.mark.slow
def test_the_template_plugin_applies_exactly_its_plan(site, capsys):
    changes = check_applied_as_planned(site, "tmpl_noise: {}", capsys)
    assert {r["kind"] for r in changes} >= {"hidden", "conv"}


@pytest.mark.slow
def test_a_plugin_that_overrides_only_plan_gets_exactly_its_rows_inserted(site, capsys):
    changes = check_applied_as_planned(site, "relu_drop: {rate: 0.3}", capsys)
    assert {r["anchor"] for r in changes} == {"act", "block.1", "conv_act"}  # every nn.ReLU module
    assert all(r["action"] == "after" and r["rate"] == 0.3 for r in changes)


@pytest.mark.parametrize(("selection", "expected"), [
    ("hand_wrap: {}", "regularizer 'hand_wrap' (plugin 'unappliable', regfw_unappliable.HandWrap): plan() returned "
                      "a 'wrap' row (path 'act', anchor 'act'), which apply() carries out with wrap(), and HandWrap "
                      "does not define wrap()"),
    ("inserter: {}", "regularizer 'inserter' (plugin 'unappliable', regfw_unappliable.Inserter): plan() returned a "
                     "row it cannot carry out (path 'act', anchor 'act'): its action 'insert' is not one of before, "
                     "after, set, wrap, note"),
    ("no_maker: {}", "regularizer 'no_maker' (plugin 'unappliable', regfw_unappliable.NoMaker): plan() returned "
                     "an 'after' row (path 'act', anchor 'act'), which apply() carries out with make_module(), and "
                     "NoMaker does not define make_module()"),
    ("twice: {}", "regularizer 'twice' (plugin 'unappliable', regfw_unappliable.Twice): plan() returned two "
                  "'after' rows on one layer (path 'act', anchor 'act'); apply() inserts one module after a layer"),
    ("half_apply: {}", "regularizer 'half_apply' (plugin 'unappliable', regfw_unappliable.HalfApply): "
                       "regfw_unappliable.HalfApply.apply() left 3 of its 3 planned change(s) undone "
                       "(after path 'act', anchor 'act'; after path 'block.1', anchor 'block.1'; after path "
                       "'conv_act', anchor 'conv_act'), which `regfw plan` lists as done"),
])
def test_a_plan_that_cannot_be_applied_as_printed_is_refused_by_plan_and_fit(site, selection, expected, capsys):
    cfg = _write(site, selection)
    for command in ("plan", "fit"):
        code, out, err = _run([command, str(cfg)], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err
        assert expected in lines[0], lines[0]
        assert "plan:" not in out  # no plan is printed that would not be applied
    assert not (site / "runs").exists()


def test_a_regularizer_overriding_the_one_applier_is_refused_when_it_registers(monkeypatch, fresh_plugins):
    module = types.ModuleType("own_applier")
    monkeypatch.setitem(sys.modules, "own_applier", module)
    module.__dict__.update({"regfw": regfw, "Regularizer": Regularizer})
    exec(textwrap.dedent("""
        class OwnApplier(Regularizer):
            name = "own_applier"

            def apply_row(self, model, item):
                pass

        @regfw.hookimpl
        def regfw_register_regularizers(register):
            register(OwnApplier)
    """), module.__dict__)
    register_plugin(module, "own_applier")
    try:
        with pytest.warns(PluginWarning) as caught:
            registry = get_registry()
        (text,) = [str(w.message) for w in caught if "own_applier" in str(w.message)]
        assert text.startswith("plugin 'own_applier' (no entry point) was refused: regularizer "
                               "own_applier.OwnApplier overrides apply_row() (in OwnApplier), which it may not: it "
                               "is the one applier")
        with pytest.raises(PluginError, match="overrides apply_row"):
            registry.get("own_applier")
        assert "dropout" in registry.names()
    finally:
        unregister_plugin("own_applier")


def test_rows_under_another_name_and_two_regularizers_of_one_name_are_refused_before_planning():
    from torch import nn

    from regfw.errors import ConfigError
    from regfw.extend.regularizer import PlanItem
    from regfw.placement.plan import make_plan

    class Renamed(Regularizer):
        name = "renamed"

        def plan(self, model, ctx):
            return [PlanItem("Renamed", "0", "hidden", "x", 0.1, "why", action="set", anchor="1")]

    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Linear(4, 2))
    with pytest.raises(PluginError, match=r"plan\(\) returned a row \(path '0', anchor '1'\) of regularizer "
                                          r"'Renamed', not its own name 'renamed'"):
        make_plan(model, [Renamed()])
    dropout = get_registry().get("dropout").cls
    with pytest.raises(ConfigError, match=r"^regularizers: two selected regularizers are named 'dropout' "
                                          r"\(regfw_plugins\.dropout\.Dropout and regfw_plugins\.dropout\.Dropout\)"):
        make_plan(model, [dropout(), dropout()])
    assert [type(m).__name__ for m in model] == ["Linear", "Dropout", "Linear"]  # nothing changed
