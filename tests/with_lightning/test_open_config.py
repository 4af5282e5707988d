"""Lightning's conventions in the config: optimizer/lr_scheduler/loss by class path, data keys, batch formats."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from regfw.build.factory import build_datamodule
from regfw.build.fit import build_fit
from regfw.config.schema import load_config
from regfw.errors import ConfigError
from regfw.run.job import fit
from regfw.train.module import RegularizedModule

from .doc_modules import dict_data


def _write(tmp_path, text: str):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_optimizer_and_scheduler_by_class_path_get_the_weight_decay_groups(tmp_path):
    cfg = load_config(_write(tmp_path, """
optimizer: {class_path: AdamW, init_args: {lr: 0.01, betas: [0.8, 0.9]}}
lr_scheduler: {class_path: torch.optim.lr_scheduler.StepLR, init_args: {step_size: 1, gamma: 0.5}, interval: step}
regularizers: {weight_decay: {strength: 0.02}}
"""))
    module = build_fit(cfg).module
    configured = module.configure_optimizers()
    opt, sched = configured["optimizer"], configured["lr_scheduler"]
    assert isinstance(opt, torch.optim.AdamW) and tuple(opt.defaults["betas"]) == (0.8, 0.9)
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.02]  # the regularizer's groups
    assert isinstance(sched["scheduler"], torch.optim.lr_scheduler.StepLR) and sched["interval"] == "step"
    assert "lr_scheduler: null" not in cfg.to_yaml() and "StepLR" in cfg.to_yaml()


def test_a_scheduler_runs_per_step_in_a_fit(tmp_path):
    cfg = load_config(_write(tmp_path, """
data: {name: digits, batch_size: 256}
optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.1}}
lr_scheduler: {class_path: StepLR, init_args: {step_size: 1, gamma: 0.5}, interval: step}
trainer: {max_epochs: 1, enable_progress_bar: false}
uncertainty: {enabled: false}
"""))
    result = fit(cfg, run_dir=str(tmp_path / "run"), quiet=True)
    steps = result.module.trainer.global_step
    assert steps == 6  # 1347 training digits / 256
    assert result.module.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** steps)


@pytest.mark.parametrize("text, message", [
    ("optimizer: {class_path: AdamW, lr: 0.1}",
     "optimizer.lr: with optimizer.class_path, put lr in optimizer.init_args (Lightning's convention), "
     "e.g. optimizer.init_args.lr=0.1"),
    ("optimizer: {class_path: NoSuchOptimizer}", "optimizer.class_path: got 'NoSuchOptimizer', which is not a class "
                                                 "of torch.optim"),
    ("lr_scheduler: {init_args: {T_max: 3}}", "lr_scheduler.class_path: missing"),
    ("lr_scheduler: {class_path: StepLR, interval: batch}", "lr_scheduler.interval: got 'batch', expected one of "
                                                            "'epoch', 'step'"),
    ("model: {loss: hubber}", "model.loss: got 'hubber', expected auto, one of cross_entropy, mse, gaussian_nll, or a "
                              "class path"),
    ("data: {batch: {inputs: image, labels: label}}", "data.batch.labels: unknown key"),
])
def test_bad_open_settings_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        cfg = load_config(_write(tmp_path, text))
        build_fit(cfg).module.configure_optimizers()
    assert message in str(err.value)


def test_loss_by_class_path_with_init_args_and_the_task_it_implies():
    huber = RegularizedModule(nn.Linear(3, 1), loss={"class_path": "torch.nn.HuberLoss", "init_args": {"delta": 0.5}})
    assert isinstance(huber.loss_fn, nn.HuberLoss) and huber.loss_fn.delta == 0.5 and huber.task == "regression"
    smooth = RegularizedModule(nn.Linear(3, 2), loss={"class_path": "torch.nn.CrossEntropyLoss",
                                                      "init_args": {"label_smoothing": 0.1}})
    assert smooth.task == "classification"
    assert RegularizedModule(nn.Linear(3, 2), loss="torch.nn.functional.nll_loss").task == "classification"
    reloaded = RegularizedModule(nn.Linear(3, 1), **{k: v for k, v in huber.hparams.items() if k == "loss"})
    assert isinstance(reloaded.loss_fn, nn.HuberLoss) and reloaded.loss_fn.delta == 0.5  # hparams rebuild it


def test_a_callable_optimizer_gets_the_groups():
    import functools

    module = RegularizedModule(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
                               regularizers={"weight_decay": {"strength": 0.1}},
                               optimizer=functools.partial(torch.optim.SGD, lr=0.5))
    opt = module.configure_optimizers()
    assert isinstance(opt, torch.optim.SGD) and {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.1}


def test_data_keys_reach_a_class_path_data_module_or_are_refused(tmp_path):
    cfg = load_config(_write(tmp_path, "data: {class_path: with_lightning.doc_modules.LitDataModule, batch_size: 4}"))
    assert build_datamodule(cfg.data).batch_size == 4
    cfg = load_config(_write(tmp_path, "data: {class_path: with_lightning.doc_modules.LitDataModule}"))
    assert build_datamodule(cfg.data).batch_size == 16  # unset: its own default, and recorded as unset
    assert "batch_size: null" in cfg.to_yaml()
    cfg = load_config(_write(tmp_path, "data: {class_path: with_lightning.doc_modules.FixedBatchDataModule, "
                                       "batch_size: 4}"))
    with pytest.raises(ConfigError, match=r"data.batch_size=4: FixedBatchDataModule takes no 'batch_size' argument "
                                          r"\(it takes seed\); set its own argument in data.init_args, or remove "
                                          r"data.batch_size"):
        build_datamodule(cfg.data)


def test_the_plan_says_what_it_assumed_for_a_data_module_without_the_optional_methods(tmp_path):
    cfg = load_config(_write(tmp_path, """
data: {class_path: with_lightning.doc_modules.LitDataModule}
model: {name: mlp, init_args: {in_features: 20, num_outputs: 3}}
regularizers: {dropout: {}}
"""))
    plan = build_fit(cfg).module.plan.format()
    assert "plan: N=120 training examples" in plan
    assert "data: LitDataModule has no n_train; N=120 is the length of its training dataset" in plan
    assert "data: LitDataModule has no example_input(); the model was traced on the input of its first training " \
           "batch" in plan


def test_dict_batches_through_the_module_and_the_mc_callback():
    from regfw.uncertainty import MCDropoutUncertainty

    loader = dict_data()  # {"x": ...}: a reconstruction task, the target is the input
    loader.collate_fn = lambda rows: {"features": torch.stack([r["x"] for r in rows]),
                                      "target": torch.stack([r["x"][:1] for r in rows])}
    torch.manual_seed(0)
    module = RegularizedModule(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1)), loss="mse",
                               regularizers={"dropout": {"hidden": 0.3}},
                               batch={"inputs": "features", "targets": "target"})
    mc = MCDropoutUncertainty(samples=4, task="regression", plots=False)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[mc], num_sanity_val_steps=0)
    trainer.fit(module, loader, loader)
    assert "val_loss" in trainer.callback_metrics and mc.last_metrics["mc/rmse"] > 0
