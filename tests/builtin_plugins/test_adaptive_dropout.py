"""AdaptiveDropout: the rule, the ranges, patience and cooldown, checkpoint state, the plugin, and
two real fits -- an overfitting one where the rates go up and an underfitting one where they go down."""
from __future__ import annotations

import io
import json
import logging

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from regfw_plugins.adaptive import AdaptiveDropoutConfig
from regfw_plugins.adaptive.callback import DOWN, HOLD, UP, diagnose
from regfw_plugins.adaptive.callback import AdaptiveDropoutCallback as AdaptiveDropout

from regfw.build.datasets import DigitsDataModule
from regfw.build.models import MLP
from regfw.config.schema import validate
from regfw.errors import ConfigError
from regfw.registry.regularizers import build_regularizers
from regfw.train.module import RegularizedModule

INPUT = "model.body.0.regfw_input_dropout"
HIDDEN = ("model.body.1.regfw_dropout", "model.body.3.regfw_dropout")




def _module(hidden: float = 0.4, input: float = 0.15, widths=(32, 16), lr: float = 1e-3) -> RegularizedModule:
    torch.manual_seed(0)
    return RegularizedModule(MLP(64, 10, widths), regularizers={"dropout": {"hidden": hidden, "input": input}},
                             optimizer={"name": "adam", "lr": lr}, example_input=torch.zeros(2, 64))


def _trainer(**kw) -> pl.Trainer:
    args = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                enable_checkpointing=False)
    args.update(kw)
    return pl.Trainer(**args)


# -- the rule ---------------------------------------------------------------------------------------


def test_diagnose_names_each_rule_in_its_reason():
    up = diagnose(0.05, 0.40, gap_threshold=0.1)
    assert up.direction == UP and up.reason.startswith("overfitting: val_loss - train_loss = 0.35 > gap_threshold 0.1")
    high = diagnose(1.5, 1.55, gap_threshold=0.1, loss_threshold=1.0)
    assert high.direction == DOWN and "train_loss 1.5 > loss_threshold 1" in high.reason
    stalled = diagnose(0.50, 0.52, gap_threshold=0.1, previous_train_loss=0.502, stall_delta=0.01)
    assert stalled.direction == DOWN and "stalled" in stalled.reason and "0.40% < stall_delta 1%" in stalled.reason
    still_falling = diagnose(0.50, 0.52, gap_threshold=0.1, previous_train_loss=0.60, stall_delta=0.01)
    assert still_falling.direction == HOLD
    # a stall with a gap above gap_threshold / 2 is not underfitting
    assert diagnose(0.50, 0.58, gap_threshold=0.1, previous_train_loss=0.50, stall_delta=0.01).direction == HOLD
    # overfitting wins over a high training loss
    assert diagnose(1.5, 1.9, gap_threshold=0.1, loss_threshold=1.0).direction == UP


def test_moves_stay_in_each_kinds_range():
    """Hidden moves within 0.3-0.5 and input within 0.1-0.2 (the rate table); at the bound the
    decision says so and nothing changes."""
    module = _module(hidden=0.4, input=0.15)
    cb = AdaptiveDropout(step=0.07, patience=1, stall_delta=None)
    targets = cb.bind(module)
    assert {t.path: t.kind for t in targets} == {INPUT: "input", HIDDEN[0]: "hidden", HIDDEN[1]: "hidden"}
    assert cb.rates() == {INPUT: 0.15, HIDDEN[0]: 0.4, HIDDEN[1]: 0.4}
    d = cb.observe(train_loss=0.1, val_loss=1.0)
    assert d.action == "raise" and cb.rates() == {INPUT: 0.2, HIDDEN[0]: 0.47, HIDDEN[1]: 0.47}
    assert module.model.body[1].regfw_dropout.p == 0.47  # the module itself changed
    cb.observe(train_loss=0.1, val_loss=1.0)
    d = cb.observe(train_loss=0.1, val_loss=1.0)
    assert d.action == "at_bound" and d.changes == {} and "every rate is at its upper bound" in d.reason
    assert cb.rates() == {INPUT: 0.2, HIDDEN[0]: 0.5, HIDDEN[1]: 0.5}
    cb.config.loss_threshold = 1.0
    for _ in range(5):
        d = cb.observe(train_loss=2.0, val_loss=2.0)
    assert d.action == "at_bound" and "lower bound" in d.reason
    assert cb.rates() == {INPUT: 0.1, HIDDEN[0]: 0.3, HIDDEN[1]: 0.3}


def test_moves_stay_in_the_regularizers_own_range():
    """Alpha dropout declares 0.05-0.1 (rate_ranges); the schedule never takes it to the table's 0.3-0.5."""
    torch.manual_seed(0)
    module = RegularizedModule(MLP(64, 10, (32, 16)), regularizers={"alpha_dropout": {"hidden": 0.08, "input": 0.05}},
                               example_input=torch.zeros(2, 64))
    cb = AdaptiveDropout(step=0.05, patience=1, stall_delta=None)
    targets = cb.bind(module)
    assert {(t.kind, t.low, t.high) for t in targets} == {("input", 0.05, 0.1), ("hidden", 0.05, 0.1)}
    for _ in range(3):
        cb.observe(train_loss=0.1, val_loss=1.0)  # overfitting: raise
    assert sorted(cb.rates().values()) == [0.1, 0.1, 0.1]
    assert cb.history[-1].action == "at_bound"


def test_rate_outside_its_range_never_moves_further_out():
    module = _module(hidden=0.7, input=0.15)
    cb = AdaptiveDropout(step=0.05, patience=1, stall_delta=None, kinds=["hidden"])
    cb.bind(module)
    assert set(cb.rates()) == set(HIDDEN)  # kinds=[hidden] leaves the input layer alone
    assert cb.observe(0.1, 1.0).action == "at_bound"
    assert cb.rates()[HIDDEN[0]] == 0.7
    cb.config.loss_threshold = 0.5
    assert cb.observe(2.0, 2.0).action == "lower"
    assert cb.rates()[HIDDEN[0]] == pytest.approx(0.65)


def test_min_and_max_rate_replace_the_kind_ranges():
    cb = AdaptiveDropout(step=0.2, patience=1, stall_delta=None, max_rate=0.8)
    cb.bind(_module(hidden=0.5))
    cb.observe(0.1, 1.0)
    cb.observe(0.1, 1.0)
    assert cb.rates()[HIDDEN[0]] == 0.8 and cb.rates()[INPUT] == 0.55


def test_patience_and_cooldown():
    cb = AdaptiveDropout(step=0.05, patience=2, cooldown=1, stall_delta=None)
    cb.bind(_module(hidden=0.3))
    assert cb.observe(0.1, 1.0).action == "wait"  # 1/2
    assert cb.observe(0.1, 0.15).action == "hold"  # the streak is broken
    assert cb.observe(0.1, 1.0).action == "wait"  # 1/2 again
    assert cb.observe(0.1, 1.0).action == "raise"  # 2/2
    assert cb.rates()[HIDDEN[0]] == 0.35
    d = cb.observe(0.1, 1.0)
    assert d.action == "wait" and "cooling down" in d.reason
    assert [cb.observe(0.1, 1.0).action for _ in range(2)] == ["wait", "raise"]
    assert cb.rates()[HIDDEN[0]] == 0.4


def test_constructor_rejects_bad_settings_with_the_value():
    """The keyword constructor validates exactly as the config section does (one validator)."""
    with pytest.raises(ConfigError, match=r"AdaptiveDropout\.step: got 0\.0, expected a value in \(0, 1\)"):
        AdaptiveDropout(step=0)
    with pytest.raises(ConfigError, match=r"AdaptiveDropout\.patience: got 0, expected a value in > 0"):
        AdaptiveDropout(patience=0)
    with pytest.raises(ConfigError, match=r"AdaptiveDropout\.kinds: got \['hiden'\], expected kinds among input"):
        AdaptiveDropout(kinds=["hiden"])
    with pytest.raises(ConfigError, match=r"AdaptiveDropout\.train_loss: got 'eval', expected one of 'clean', 'noisy'"):
        AdaptiveDropout(train_loss="eval")
    with pytest.raises(ConfigError, match=r"AdaptiveDropout\.setp: unknown key.*Did you mean 'step'"):
        AdaptiveDropout(setp=0.1)
    with pytest.raises(TypeError, match="as one AdaptiveDropoutConfig or as keywords, not both"):
        AdaptiveDropout(AdaptiveDropoutConfig(), step=0.1)


# -- checkpoint state ------------------------------------------------------------------------------


def test_state_dict_round_trip_gives_the_same_next_decision():
    """Mid-streak (1 of 2 validations seen) and after a move: a fresh callback loaded from the saved
    state (through torch.save, as in a checkpoint) and bound to a fresh model takes the same next
    decision and ends with the same rates; a fresh callback without the state does not."""
    cb = AdaptiveDropout(step=0.05, patience=2, stall_delta=0.01)
    cb.bind(_module(hidden=0.3))
    for losses in [(0.1, 1.0), (0.1, 1.0), (0.1, 1.0)]:  # raise at the 2nd, streak 1/2 after the 3rd
        cb.observe(*losses)
    assert cb.rates()[HIDDEN[0]] == 0.35 and cb.streak == 1
    buffer = io.BytesIO()
    torch.save(cb.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=False)

    fresh_model = _module(hidden=0.3)
    resumed = AdaptiveDropout(step=0.05, patience=2, stall_delta=0.01)
    resumed.load_state_dict(state)
    resumed.bind(fresh_model)
    assert resumed.rates() == cb.rates()
    assert fresh_model.model.body[3].regfw_dropout.p == 0.35
    assert resumed.history == cb.history

    expected = cb.decide(0.1, 1.0, epoch=3)
    assert resumed.decide(0.1, 1.0, epoch=3) == expected
    assert expected.action == "raise"
    unloaded = AdaptiveDropout(step=0.05, patience=2, stall_delta=0.01)
    unloaded.bind(_module(hidden=0.3))
    assert unloaded.decide(0.1, 1.0, epoch=3).action == "wait"  # without the state: a different decision
    cb.observe(0.1, 1.0, epoch=3)
    resumed.observe(0.1, 1.0, epoch=3)
    assert resumed.rates() == cb.rates() == {INPUT: 0.2, HIDDEN[0]: 0.4, HIDDEN[1]: 0.4}
    # the stall rule remembers the previous training loss across the checkpoint too
    assert resumed.decide(0.1, 0.12) == cb.decide(0.1, 0.12)


def test_resumed_fit_continues_the_schedule(tmp_path):
    """A Lightning fit resumed from its checkpoint restores the callback: the history continues and
    the rates in effect when training restarts are the ones saved, not the plan's."""
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=32, train_fraction=0.05, seed=0)

    class RatesAtStart(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.rates = {n: m.p for n, m in pl_module.named_modules() if n.endswith("regfw_dropout")}

    first = AdaptiveDropout(step=0.05, patience=1, stall_delta=None)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _trainer(max_epochs=3, enable_checkpointing=True, callbacks=[first, ckpt], num_sanity_val_steps=0).fit(
        _module(hidden=0.3, widths=(256, 256), lr=1e-2), datamodule=dm)
    assert any(d.action == "raise" for d in first.history), first.history
    saved = first.rates()
    assert saved[HIDDEN[0]] > 0.3

    second, probe = AdaptiveDropout(step=0.05, patience=1, stall_delta=None), RatesAtStart()
    _trainer(max_epochs=4, callbacks=[second, probe], num_sanity_val_steps=0).fit(
        _module(hidden=0.3, widths=(256, 256), lr=1e-2), datamodule=dm, ckpt_path=str(tmp_path / "last.ckpt"))
    assert probe.rates == {k: v for k, v in saved.items() if k in HIDDEN}  # not the plan's 0.3
    assert second.history[:3] == first.history
    assert [d.epoch for d in second.history] == [0, 1, 2, 3]


# -- selection through the config -------------------------------------------------------------------


def test_plugin_is_selected_by_name_with_its_options():
    regs = build_regularizers({"dropout": {}, "adaptive_dropout": {"step": 0.1, "patience": 3,
                                                                    "gap_threshold": 0.2, "loss_threshold": 1.5}})
    (cb,) = regs[1].callbacks()
    assert isinstance(cb, AdaptiveDropout)
    assert cb.config is regs[1].config  # the validated settings, passed as one object
    assert (cb.config.step, cb.config.patience, cb.config.gap_threshold, cb.config.loss_threshold) == (0.1, 3, 0.2, 1.5)
    module = RegularizedModule(MLP(64, 10), regularizers={"dropout": {}, "adaptive_dropout": {}},
                               example_input=torch.zeros(2, 64))
    assert any(isinstance(c, AdaptiveDropout) for c in module.configure_callbacks())
    assert "raise rates by 0.05 if val_loss - clean train loss > 0.1" in module.plan.format()


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError,
                       match=r"regularizers\.adaptive_dropout\.step: got 1\.5, expected a value in \(0, 1\)"):
        validate({"regularizers": {"dropout": {}, "adaptive_dropout": {"step": 1.5}}})
    with pytest.raises(ConfigError, match=r"regularizers\.adaptive_dropout\.kinds: got \['hiden'\]"):
        validate({"regularizers": {"dropout": {}, "adaptive_dropout": {"kinds": ["hiden"]}}})
    with pytest.raises(ConfigError, match=r"regularizers\.adaptive_dropout\.train_loss: got 'eval'"):
        validate({"regularizers": {"dropout": {}, "adaptive_dropout": {"train_loss": "eval"}}})
    with pytest.raises(ConfigError, match=r"regularizers\.adaptive_dropout: adapts the rates of dropout layers that "
                                          r"another regularizer inserts, but none of the selected ones"):
        validate({"regularizers": {"adaptive_dropout": {}}})


# -- real fits -------------------------------------------------------------------------------------


def test_overfitting_fit_raises_the_rates_and_logs_why(tmp_path, caplog):
    """67 training digits and a 512-512 MLP starting at the bottom of the ranges (hidden 0.3,
    input 0.1): the clean training loss falls below the validation loss by more than 0.1 from the
    third epoch on (measured gaps 0.12-0.46) and the rates go up,
    each change logged with its reason to the Python logger, the metrics and the JSON-lines file."""
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=32, train_fraction=0.05, seed=0)
    module = RegularizedModule(MLP(64, 10, (512, 512)), n_examples=dm.n_train, example_input=dm.example_input(),
                               optimizer={"name": "adam", "lr": 1e-2},
                               regularizers={"dropout": {"hidden": 0.3, "input": 0.1},
                                             "adaptive_dropout": {"patience": 1, "step": 0.05}})
    logger = CSVLogger(str(tmp_path), name="", version="")
    with caplog.at_level(logging.INFO, logger="regfw.adaptive"):
        _trainer(max_epochs=6, logger=logger).fit(module, datamodule=dm)
    (cb,) = [c for c in module.trainer.callbacks if isinstance(c, AdaptiveDropout)]
    raises = [d for d in cb.history if d.action == "raise"]
    assert raises and all(d.reason.startswith("overfitting") for d in raises)
    assert cb.rates()[HIDDEN[0]] >= 0.4 and cb.rates()[INPUT] > 0.1
    assert all(d.action != "lower" for d in cb.history)

    records = [r.getMessage() for r in caplog.records if r.name == "regfw.adaptive"]
    assert any("raise (overfitting" in m and f"{HIDDEN[0]}: 0.3 -> 0.35" in m for m in records)
    lines = [json.loads(line) for line in (tmp_path / "adaptive_dropout.jsonl").read_text().splitlines()]
    assert [entry["changes"] for entry in lines] == [d.changes for d in cb.history if d.changes]
    assert all(entry["reason"].startswith("overfitting") for entry in lines)
    import csv

    rows = [r for r in csv.DictReader(open(tmp_path / "metrics.csv")) if r.get("adaptive_dropout/rate/hidden")]
    hidden = [float(r["adaptive_dropout/rate/hidden"]) for r in rows]
    assert hidden == sorted(hidden) and hidden[-1] > 0.3


def test_underfitting_fit_lowers_the_rates():
    """A 4-unit MLP at the top of the ranges (hidden 0.5, input 0.2), trained slowly: the training
    loss stays above loss_threshold (1.0) and the rates go down to the bottom of the ranges."""
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=64, train_fraction=0.3, seed=0)
    module = RegularizedModule(MLP(64, 10, (4,)), n_examples=dm.n_train, example_input=dm.example_input(),
                               optimizer={"name": "adam", "lr": 1e-4},
                               regularizers={"dropout": {"hidden": 0.5, "input": 0.2},
                                             "adaptive_dropout": {"patience": 1, "step": 0.05, "loss_threshold": 1.0}})
    _trainer(max_epochs=4, num_sanity_val_steps=0).fit(module, datamodule=dm)
    (cb,) = [c for c in module.trainer.callbacks if isinstance(c, AdaptiveDropout)]
    assert [d.action for d in cb.history] == ["lower", "lower", "lower", "lower"]
    assert all(d.train_loss > 1.0 and "underfitting: train_loss" in d.reason for d in cb.history)
    rates = cb.rates()
    assert rates["model.body.1.regfw_dropout"] == pytest.approx(0.3)  # 0.5 - 4 x 0.05, at the range bottom
    assert rates[INPUT] == pytest.approx(0.1)
