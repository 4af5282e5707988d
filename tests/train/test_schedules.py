"""Rate schedules: the shapes, their config errors, the plan line, the rates a fit sees step by
step, the logged rates, and a resume mid-schedule that ends bitwise where an uninterrupted run does."""
from __future__ import annotations

import math
import os
import signal

import pytest
import pytorch_lightning as pl
import torch

from regfw.config.schema import load_config
from regfw.errors import ConfigError
from regfw.registry.regularizers import build_regularizers
from regfw.run.job import fit
from regfw.train.schedules import RateSchedule


def test_linear_warm_up_reaches_each_layers_planned_rate_and_stays():
    s = RateSchedule(kind="linear", start=0.0, epochs=10)
    assert [s.rate(0.2, t) for t in (0, 2.5, 5, 10, 30)] == pytest.approx([0.0, 0.05, 0.1, 0.2, 0.2])
    # a depth profile is kept: every block follows the shape to its own rate
    assert [s.rate(p, 5) for p in (0.0, 0.1, 0.3)] == pytest.approx([0.0, 0.05, 0.15])
    assert RateSchedule(kind="linear", start=0.1, steps=4).rate(0.5, 1) == pytest.approx(0.2)


def test_cosine_step_early_late_shapes():
    cos = RateSchedule(kind="cosine", start=0.0, steps=100)
    assert cos.rate(0.4, 0) == 0.0 and cos.rate(0.4, 50) == pytest.approx(0.2)
    assert cos.rate(0.4, 100) == pytest.approx(0.4)
    assert cos.rate(0.4, 25) == pytest.approx(0.4 * (1 - math.cos(math.pi / 4)) / 2)
    decay = RateSchedule(kind="cosine", start=0.5, steps=10)  # start above the target: a decay
    assert decay.rate(0.1, 0) == 0.5 and decay.rate(0.1, 10) == pytest.approx(0.1)
    step = RateSchedule(kind="step", start=0.0, epochs=9, stages=3)
    assert [step.rate(0.3, t) for t in (0, 2.9, 3, 5.9, 6, 9, 12)] == pytest.approx([0, 0, 0.1, 0.1, 0.2, 0.3, 0.3])
    early = RateSchedule(kind="early", epochs=5)  # Liu et al. 2023: on for the first K epochs
    assert [early.rate(0.1, t) for t in (0, 4.99, 5, 20)] == [0.1, 0.1, 0.0, 0.0]
    late = RateSchedule(kind="late", epochs=5)  # off first, then on
    assert [late.rate(0.1, t) for t in (0, 4.99, 5, 20)] == [0.0, 0.0, 0.1, 0.1]
    assert RateSchedule().rate(0.3, 7) == 0.3 and not RateSchedule().active


def test_schedule_config_errors_name_the_key_the_value_and_the_fix():
    with pytest.raises(ConfigError, match=r"regularizers\.dropblock\.schedule\.kind: got 'linaer', expected one of "
                                          r".*Did you mean 'linear'"):
        build_regularizers({"dropblock": {"schedule": {"kind": "linaer", "epochs": 10}}})
    with pytest.raises(ConfigError, match=r"regularizers\.dropblock\.schedule: kind 'linear' needs its "
                                          r"length as exactly one of `epochs` or `steps`, neither given"):
        build_regularizers({"dropblock": {"schedule": {"kind": "linear"}}})
    with pytest.raises(ConfigError, match=r"both given"):
        build_regularizers({"dropout": {"schedule": {"kind": "cosine", "epochs": 2, "steps": 5}}})
    with pytest.raises(ConfigError, match=r"regularizers\.dropout\.schedule\.start: got 1\.5, expected a value in "
                                          r"\[0, 1\)"):
        build_regularizers({"dropout": {"schedule": {"kind": "linear", "start": 1.5, "epochs": 2}}})
    with pytest.raises(ConfigError, match=r"regularizers\.locked_dropout\.schedule\.epochs: got -1\.0, expected a "
                                          r"value in > 0"):
        build_regularizers({"locked_dropout": {"schedule": {"kind": "late", "epochs": -1}}})
    with pytest.raises(ConfigError, match=r"regularizers\.dropout\.schedule\.start: got 0\.1, but kind 'early' "
                                          r"switches between 0 and the planned rate; remove `start`"):
        build_regularizers({"dropout": {"schedule": {"kind": "early", "start": 0.1, "epochs": 3}}})
    with pytest.raises(ConfigError, match=r"regularizers\.drop_path\.schedule\.stages: got 0"):
        build_regularizers({"drop_path": {"schedule": {"kind": "step", "epochs": 3, "stages": 0}}})


def test_a_schedule_with_adaptive_dropout_on_the_same_layers_is_one_clear_config_error(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("regularizers:\n  dropout: {schedule: {kind: linear, epochs: 5}}\n  adaptive_dropout: {}\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert str(err.value) == (
        "regularizers.dropout.schedule and regularizers.adaptive_dropout both set the rates of dropout's layers (a "
        "schedule fixes each rate as a function of training time); remove one, or keep adaptive_dropout off those "
        "kinds with regularizers.adaptive_dropout.kinds")
    assert "\n" not in str(err.value)
    # on kinds the schedule does not touch, the two compose
    cfg.write_text("regularizers:\n  drop_path: {schedule: {kind: linear, epochs: 5}}\n  dropout: {}\n"
                   "  adaptive_dropout: {kinds: [hidden]}\n")
    load_config(cfg)


def test_regfw_plan_shows_the_schedule(tmp_path, monkeypatch, capsys):
    from regfw.cli.main import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.yaml").write_text(
        "model: {name: cnn}\nregularizers:\n  dropblock: {conv: 0.1, block_size: 3, schedule: {kind: linear, start: "
        "0.0, epochs: 10}}\n")
    assert main(["plan", "cfg.yaml"]) == 0
    out = capsys.readouterr().out
    assert ("dropblock: rate schedule linear: from 0 to the planned rates over 10 epoch(s); updated every "
            "optimizer step") in out


CONFIG = """
seed: 0
data: {name: digits, batch_size: 32, train_fraction: 0.3}
model: {name: mlp, init_args: {hidden: [32]}}
optimizer: {name: adam, lr: 0.01}
regularizers:
  dropout: {hidden: 0.4, input: 0, schedule: {kind: linear, start: 0.0, steps: 20}}
uncertainty: {enabled: true, samples: 4, plots: false}
trainer: {max_epochs: 2, deterministic: true, enable_progress_bar: false, enable_model_summary: false,
          log_every_n_steps: 1}
run: {checkpoint_every_n_steps: 7}
"""
STEPS = 26  # 2 epochs x 13 batches of 32 (404 training examples)


class RateProbe(pl.Callback):
    """Records, after each optimizer step, the rate the step's forward pass used."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append((trainer.global_step - 1, float(pl_module.model.body[1].regfw_dropout.p)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("schedules")
    (root / "cfg.yaml").write_text(CONFIG)
    cwd = os.getcwd()
    os.chdir(root)
    probe = RateProbe()
    try:
        result = fit(load_config("cfg.yaml"), run_dir="reference", quiet=True, callbacks=[probe])
    finally:
        os.chdir(cwd)
    return root, result, probe


def test_a_fit_sets_the_rate_of_every_step_from_the_schedule_and_logs_it_per_epoch(reference):
    root, result, probe = reference
    assert len(probe.seen) == STEPS
    assert [s for s, _ in probe.seen] == list(range(STEPS))
    assert [p for _, p in probe.seen] == pytest.approx([0.4 * min(s / 20, 1.0) for s in range(STEPS)], abs=1e-12)
    assert result.module.model.body[1].regfw_dropout.p == pytest.approx(0.4)
    rows = (root / "reference" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert "rate/dropout/hidden" in header
    col = header.index("rate/dropout/hidden")
    logged = [float(r.split(",")[col]) for r in rows[1:] if r.split(",")[col]]
    # end of epoch 0: the rate set at step 12; end of epoch 1: at the target
    assert logged == pytest.approx([0.4 * 12 / 20, 0.4])


def test_the_rates_seen_by_the_forward_pass_follow_the_schedule_exactly(reference):
    from regfw.train.module import RegularizedModule
    from regfw.train.schedule_callback import RateScheduler

    module = RegularizedModule(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)),
                               regularizers={"dropout": {"hidden": 0.3, "input": 0,
                                                         "schedule": {"kind": "cosine", "steps": 4}}},
                               example_input=torch.zeros(2, 4))
    (scheduler,) = module.configure_callbacks()
    assert isinstance(scheduler, RateScheduler)
    scheduler.bind(module)
    assert [layer.path for layer in scheduler.layers] == ["1.regfw_dropout"]
    values = []
    for t in range(6):
        scheduler.step(float(t))
        values.append(module.model[1].regfw_dropout.p)
    assert values == pytest.approx([0.3 * (1 - math.cos(math.pi * min(t / 4, 1))) / 2 for t in range(6)])


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Preempt(pl.Callback):
    """Sends this process SIGTERM before global step ``at`` (a cluster scheduler preempting the job)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_run_killed_mid_schedule_resumes_bitwise_where_the_uninterrupted_run_ends(reference):
    from regfw.errors import RunInterrupted
    from regfw.run.checkpoints import read_checkpoint

    root, result, _ = reference
    cwd = os.getcwd()
    os.chdir(root)
    try:
        with pytest.raises(RunInterrupted, match="stopped by SIGTERM at global step 8"):
            fit(load_config("cfg.yaml"), run_dir="part", quiet=True, callbacks=[Preempt(7)])
        stopped = read_checkpoint(root / "part" / "checkpoints" / "last.ckpt")
        assert stopped["global_step"] == 8 and stopped["epoch"] == 0  # mid-epoch 0 and mid-schedule
        (state,) = [v for k, v in stopped["callbacks"].items() if k.startswith("RateScheduler")]
        assert state["position"] == 7.0 and state["rates"] == {"body.1.regfw_dropout": pytest.approx(0.4 * 7 / 20)}
        resumed = fit(load_config("cfg.yaml"), run_dir="part", resume=True, quiet=True)
    finally:
        os.chdir(cwd)
    final = read_checkpoint(resumed.checkpoint)
    assert final["global_step"] == STEPS
    assert _same(final["state_dict"], result.module.state_dict())  # bitwise
    assert final["regfw"]["rates"] == read_checkpoint(result.checkpoint)["regfw"]["rates"]


def test_late_dropout_leaves_mc_dropout_off_while_every_rate_is_0(tmp_path):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    (tmp_path / "cfg.yaml").write_text(CONFIG.replace("kind: linear, start: 0.0, steps: 20", "kind: late, epochs: 1")
                                       .replace("run: {checkpoint_every_n_steps: 7}", ""))
    try:
        with pytest.warns(UserWarning, match="every dropout rate is 0 at epoch 0 .*skipped this epoch"):
            result = fit(load_config("cfg.yaml"), run_dir="late", quiet=True)
    finally:
        os.chdir(cwd)
    assert result.module.model.body[1].regfw_dropout.p == pytest.approx(0.4)
    assert "mc/acc" in result.metrics  # epoch 1 sampled, with the rate on


def test_scheduled_drop_path_grows_every_blocks_depth_rate_linearly_over_training():
    """Zoph et al. 2018 on top of the depth profile of Huang et al. 2016: block k of n (k from 0)
    reaches rate * k / (n - 1) at the end of the ramp, every block at the same fraction of its rate."""
    from models_zoo import SmallResNet

    from regfw.train.module import RegularizedModule

    module = RegularizedModule(SmallResNet(), regularizers={"drop_path": {"rate": 0.2, "schedule": {
        "kind": "linear", "epochs": 10, "every": "epoch"}}}, example_input=torch.zeros(2, 3, 16, 16))
    (scheduler,) = module.configure_callbacks()
    scheduler.bind(module)
    targets = [layer.target for layer in scheduler.layers]
    assert targets == pytest.approx([0.2 / 3, 0.4 / 3, 0.2])  # block 1 of 4 has rate 0: nothing inserted
    for t in (0.0, 2.0, 5.0, 10.0, 12.0):
        scheduler.step(t)
        rates = [layer.module.p for layer in scheduler.layers]
        assert rates == pytest.approx([p * min(t / 10, 1.0) for p in targets])
    assert "rate schedule linear: from 0 to the planned rates over 10 epoch(s); updated at the start of every epoch" \
        in module.plan.format()


def test_dropblock_warm_up_and_attention_dropout_schedules_set_the_layers_they_planned():
    from models_zoo import SmallTransformer

    from regfw.train.module import RegularizedModule

    cnn = RegularizedModule(model_config={"name": "cnn"}, regularizers={"dropblock": {
        "conv": 0.1, "block_size": 3, "schedule": {"kind": "linear", "steps": 100}}},
        example_input=torch.zeros(2, 1, 8, 8))
    (scheduler,) = cnn.configure_callbacks()
    blocks = scheduler.bind(cnn)
    assert blocks and all(type(layer.module).__name__ == "DropBlock2d" for layer in blocks)
    scheduler.step(25.0)  # Ghiasi et al. 2018: the drop rate warms up linearly to the target
    assert [layer.module.p for layer in blocks] == pytest.approx([0.025] * len(blocks))

    net = RegularizedModule(SmallTransformer(), regularizers={"attention_dropout": {
        "schedule": {"kind": "early", "steps": 3}}}, example_input=torch.zeros(2, 5, 8))
    (scheduler,) = net.configure_callbacks()
    scheduler.bind(net)
    mha = [m for m in net.model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    scheduler.step(2.0)
    assert [m.dropout for m in mha] == [0.1, 0.1]
    scheduler.step(3.0)  # early dropout is over: torch's own attention dropout is set to 0 too
    assert [m.dropout for m in mha] == [0.0, 0.0]
