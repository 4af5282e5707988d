"""regfw.Regularize on LightningModules of one's own: structure, optimizer groups, exact terms, checkpoints."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint

from regfw.errors import ConfigError
from regfw.run.distributed import StepSeeding
from regfw.train.regularize import Regularize, load_regularized
from regfw.uncertainty import mc_predict, stochastic_modules

from .doc_modules import LitAutoEncoder, LitClassifier, classification_data, dict_data


def _trainer(tmp_path, epochs: int, callbacks: list, **kw) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=callbacks, **kw)


def test_classifier_gets_dropout_and_weight_decay_groups_in_its_own_adamw_with_its_cosine_schedule(tmp_path):
    torch.manual_seed(0)
    module = LitClassifier(epochs=4)
    reg = Regularize({"dropout": {}, "weight_decay": {"strength": 0.05}})
    trainer = _trainer(tmp_path, 4, [reg], enable_checkpointing=False)
    trainer.fit(module, *classification_data())
    assert len(stochastic_modules(module)) >= 2  # injected into its network, as the plan says
    assert any(row.regularizer == "dropout" and row.action != "note" for row in reg.plan.rows())
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.AdamW)
    decay = {g["weight_decay"] for g in optimizer.param_groups if any(p.dim() > 1 for p in g["params"])}
    no_decay = {g["weight_decay"] for g in optimizer.param_groups if all(p.dim() == 1 for p in g["params"])}
    assert decay == {0.05} and no_decay == {0.0}  # biases not decayed; AdamW's default 0.01 replaced
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(module.parameters()))
    # the user's cosine schedule runs every new group: after 4 of T_max=4 epochs, lr = eta_min = 0
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert len(scheduler.base_lrs) == len(optimizer.param_groups)
    assert all(g["lr"] == pytest.approx(0.0, abs=1e-12) for g in optimizer.param_groups)
    assert "train_loss" in trainer.callback_metrics and "val_acc" in trainer.callback_metrics  # its own logging
    assert "training_step" not in module.__dict__  # unwrapped at teardown


class ManualL1(LitClassifier):
    """The same classifier adding the L1 penalty in its own training_step (the reference)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        penalty = 1e-3 * sum(p.abs().sum() for n, p in self.net.named_parameters() if p.dim() > 1)
        return F.cross_entropy(self(x), y) + penalty


def test_loss_terms_are_added_exactly_to_the_users_loss(tmp_path):
    torch.manual_seed(0)
    reference = ManualL1()
    _trainer(tmp_path, 2, [], enable_checkpointing=False, limit_val_batches=0).fit(reference, classification_data()[0])
    torch.manual_seed(0)
    module = LitClassifier()
    reg = Regularize({"l1": {"strength": 1e-3}})
    trainer = _trainer(tmp_path, 2, [reg], enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(module, classification_data()[0])
    for (name, a), b in zip(reference.state_dict().items(), module.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    assert float(trainer.callback_metrics["train_penalty/l1"]) > 0


def test_autoencoder_with_dict_batches_and_dict_step_output(tmp_path):
    torch.manual_seed(0)
    module = LitAutoEncoder()
    reg = Regularize({"dropout": {"hidden": 0.2}, "l1": {"strength": 1e-4}}, batch={"inputs": "x", "targets": None},
                     example_input=torch.zeros(2, 16))
    trainer = _trainer(tmp_path, 2, [reg], enable_checkpointing=False)
    trainer.fit(module, dict_data())
    assert stochastic_modules(module)
    assert float(trainer.callback_metrics["train_penalty/l1"]) > 0
    assert "train_loss" in trainer.callback_metrics


def test_batch_and_loss_transforms_need_regularized_module():
    with pytest.raises(ConfigError, match=r"regularizers.mixup: transforms the batch .* train with "
                                          r"regfw.RegularizedModule"):
        Regularize({"mixup": {}})
    with pytest.raises(ConfigError, match=r"regularizers.label_smoothing: transforms the loss function"):
        Regularize({"label_smoothing": {}})


def test_plan_for_is_what_setup_applies():
    torch.manual_seed(0)
    module = LitClassifier()
    reg = Regularize({"dropout": {}})
    planned = reg.plan_for(module).format()
    assert reg.apply(module).format() == planned
    assert "dropout" in planned and "N=?" in planned and "n_examples" in planned


def test_checkpoint_reloads_the_same_structure_and_resume_continues_exactly(tmp_path, capsys):
    def fit(epochs: int, root, ckpt_path=None):
        train, val = classification_data(shuffle=False)  # the loader's own order does not resume
        torch.manual_seed(0)
        module = LitClassifier(epochs=3)
        cb = ModelCheckpoint(dirpath=root, save_last=True)
        trainer = _trainer(root, epochs, [Regularize({"dropout": {}, "weight_decay": {}}, n_examples=120),
                                          StepSeeding(7), cb])
        trainer.fit(module, train, val, ckpt_path=ckpt_path)
        return module, root / "last.ckpt"

    straight, last = fit(3, tmp_path / "a")
    _, first = fit(1, tmp_path / "b")
    resumed, _ = fit(3, tmp_path / "b", ckpt_path=str(first))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # resume continues exactly (bitwise)

    loaded = load_regularized(LitClassifier, last)
    assert [n for n, _ in loaded.named_modules()] == [n for n, _ in straight.named_modules()]
    straight.eval()
    x = classification_data()[1].dataset.tensors[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), straight(x))
    result = mc_predict(loaded, x, samples=8, seed=0)  # the MC callback's sampler works on it
    assert float(result.summary.mutual_information.mean()) > 0
    assert load_regularized(None, last).__class__ is LitClassifier  # the class from the checkpoint

    # `regfw rank` ranks the config's data with it
    from regfw.cli.main import main

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("data: {class_path: with_lightning.doc_modules.LitDataModule}\n")
    assert main(["rank", str(cfg), str(last), "--k", "5", "--samples", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "top 5 of the val split by bald (index, score):" and len(lines) == 6


def test_target_names_a_missing_submodule_clearly():
    with pytest.raises(ConfigError, match=r"Regularize\(target='body'\): LitClassifier has no submodule 'body'; "
                                          r"its children are net"):
        Regularize({"dropout": {}}, target="body").network(LitClassifier())
