"""The per-step contract: the order of the step methods, what the training loss holds and logs,
the batch convention, old-style ``penalty(model)`` plugins, and wrong return types named."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from regfw import Regularizer
from regfw.config.schema import load_config
from regfw.errors import ConfigError, PluginError
from regfw.train.batch import BatchFormat, split_batch
from regfw.train.module import RegularizedModule
from regfw.train.steps import add_terms, regularized_step

CALLS: list[str] = []


@dataclass
class _Cfg:
    scale: float = 1.0


class Recorder(Regularizer):
    """Records every step method it runs; adds ``scale`` to the inputs and to the loss."""

    Config = _Cfg

    def __init__(self, name: str, order: int = 0, scale: float = 1.0) -> None:
        super().__init__(_Cfg(scale))
        self.name, self.step_order = name, order

    def transform_batch(self, inputs, targets, step):
        CALLS.append(f"{self.name}.transform_batch")
        return inputs + self.config.scale, targets

    def transform_loss(self, loss_fn, step):
        CALLS.append(f"{self.name}.transform_loss")

        def wrapped(out, y):
            CALLS.append(f"{self.name}.loss")
            return loss_fn(out, y)

        return wrapped

    def loss_term(self, step):
        CALLS.append(f"{self.name}.loss_term")
        assert step.outputs is not None and step.data_loss is not None
        return torch.tensor(self.config.scale)


class Forward(nn.Module):
    def forward(self, x):
        CALLS.append("forward")
        return x


def test_step_methods_run_in_step_order_then_config_order_around_one_forward():
    CALLS.clear()
    regs = [Recorder("a"), Recorder("late", order=100, scale=10.0), Recorder("b", scale=2.0)]
    x = torch.zeros(3, 2)
    result = regularized_step(regs, Forward(), x, torch.zeros(3, 2), F.mse_loss)
    assert CALLS == [
        "a.transform_batch", "b.transform_batch", "late.transform_batch", "forward",
        "a.transform_loss", "b.transform_loss", "late.transform_loss",
        "late.loss", "b.loss", "a.loss",  # the first listed is innermost
        "a.loss_term", "b.loss_term", "late.loss_term",
    ]
    assert torch.equal(result.inputs, x + 13)  # every batch transform applied, on the previous result
    assert list(result.terms) == ["a", "b", "late"]
    torch.testing.assert_close(result.total, result.data_loss + 13)


class OldPenalty(Regularizer):
    """A plugin written against the earlier docs: ``penalty(model)`` only."""

    name = "old_penalty"

    def penalty(self, model):
        return sum(p.abs().sum() for p in model.parameters())


def test_penalty_model_plugins_keep_working_and_add_terms_serves_a_callback():
    model = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    out = model(x)
    loss = F.cross_entropy(out, y)
    total, terms = add_terms([OldPenalty()], model, x, y, out, loss)
    expected = sum(p.abs().sum() for p in model.parameters())
    torch.testing.assert_close(terms["old_penalty"], expected)
    torch.testing.assert_close(total, loss + expected)
    total.backward()  # the term is part of the graph
    assert model.weight.grad is not None


class Bad(Regularizer):
    name = "bad"

    def __init__(self, method: str, value) -> None:
        super().__init__()
        self.method, self.value = method, value

    def describe(self, model):
        return self.value if self.method == "describe" else []

    def penalty(self, model):
        return self.value if self.method == "penalty" else None

    def transform_batch(self, inputs, targets, step):
        return self.value if self.method == "transform_batch" else (inputs, targets)


@pytest.mark.parametrize("method, value, expected", [
    ("penalty", [0.1, 0.2], r"penalty\(\) returned list \[0\.1, 0\.2\], expected None or a scalar torch\.Tensor"),
    ("transform_batch", torch.zeros(2), r"transform_batch\(\) returned Tensor .*expected a tuple \(inputs, targets\)"),
])
def test_a_wrong_return_type_names_the_plugin_and_the_method(method, value, expected):
    with pytest.raises(PluginError, match=rf"regularizer 'bad' \({__name__}\.Bad\): {expected}"):
        regularized_step([Bad(method, value)], nn.Identity(), torch.zeros(2, 2), torch.zeros(2, 2), F.mse_loss)


def test_describe_returning_a_string_is_an_error_naming_the_method():
    from regfw.placement.plan import make_plan

    with pytest.raises(PluginError, match=r"regularizer 'bad' .*: describe\(\) returned str 'one line', expected a "
                                          r"list of strings"):
        make_plan(nn.Sequential(nn.Linear(2, 2)), [Bad("describe", "one line")], example_input=torch.zeros(1, 2))


def test_batch_convention_tuples_dicts_and_bare_tensors():
    x, y = torch.zeros(2, 3), torch.ones(2)
    assert split_batch((x, y, "index")) == (x, y)
    assert split_batch([x, y]) == (x, y)
    assert split_batch(x) == (x, None)
    assert split_batch({"inputs": x, "targets": y}) == (x, y)
    assert split_batch({"image": x, "label": y}, {"inputs": "image", "targets": "label"}) == (x, y)
    assert split_batch((y, x), BatchFormat(inputs=1, targets=0)) == (x, y)
    # a dict without an "inputs" entry: the model's keyword inputs, minus every label key
    mask = torch.ones(2, 3)
    assert split_batch({"image": x, "label": y}) == ({"image": x}, y)
    assert split_batch({"input_ids": x, "attention_mask": mask, "labels": y}) == (
        {"input_ids": x, "attention_mask": mask}, y)
    assert split_batch({"input_ids": x}) == ({"input_ids": x}, None)
    with pytest.raises(ConfigError, match=r"batch: a dict batch without the inputs key 'image' \(its keys: 'pixels', "
                                          r"'label'\); name the key"):
        split_batch({"pixels": x, "label": y}, {"inputs": "image"})
    with pytest.raises(ConfigError, match=r"batch\.input: unknown key"):
        BatchFormat.coerce({"input": "image"})


def test_module_trains_on_dict_batches_and_logs_each_term_by_name(tmp_path):
    pl.seed_everything(0, verbose=False)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    items = [{"image": x[i], "label": y[i]} for i in range(64)]
    data = torch.utils.data.DataLoader(items, batch_size=16)  # collates into dicts of batched tensors
    module = RegularizedModule(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)),
                               regularizers={"dropout": {}, "rdrop": {}, "label_smoothing": {}, "l1": {}},
                               example_input=x[:2], batch={"inputs": "image", "targets": "label"})
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, data)
    logged = trainer.logged_metrics
    assert {"train_penalty/rdrop", "train_penalty/l1", "train_loss", "train_acc"} <= set(logged)
    assert logged["train_penalty/rdrop"] > 0 and logged["train_penalty/l1"] > 0
    torch.testing.assert_close(logged["train_penalty"], logged["train_penalty/rdrop"] + logged["train_penalty/l1"])
    assert module.hparams.batch == {"inputs": "image", "targets": "label"}


def test_module_accepts_built_regularizer_objects_and_uses_them_as_they_are():
    from regfw.registry.regularizers import build_regularizers

    regs = build_regularizers({"mixup": {"alpha": 0.5}, "confidence_penalty": {}})
    module = RegularizedModule(nn.Linear(4, 3), regularizers=regs, example_input=torch.zeros(2, 4))
    assert module.regularizers[0] is regs[0] and module.regularizers[1] is regs[1]
    assert module.hparams.regularizers == {"mixup": {"alpha": 0.5, "cutmix": False, "prob": 1.0},
                                           "confidence_penalty": {"strength": 0.1}}


def test_config_check_rejects_probability_regularizers_for_regression(tmp_path):
    with pytest.raises(ConfigError, match=r"regularizers\.label_smoothing: acts on class probabilities, but "
                                          r"model\.loss is 'mse'"):
        load_config(None, ["data.name=diabetes", "model.name=mlp", "model.loss=mse",
                           "regularizers.label_smoothing.epsilon=0.1"])


@pytest.mark.slow
def test_plan_shows_what_each_step_regularizer_does(tmp_path, run_cli):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("data: {name: digits}\nmodel: {name: mlp}\nregularizers:\n  dropout: {}\n  mixup: {cutmix: false}\n"
                   "  rdrop: {alpha: 2}\n  label_smoothing: {epsilon: 0.2}\n  confidence_penalty: {}\n")
    result = run_cli("plan", str(cfg))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "mixup: every batch: x = lam * x_i + (1 - lam) * x_j, lam ~ Beta(0.2, 0.2)" in out
    assert "rdrop: two passes per example in one forward call" in out and "loss += 2 / 2 * symmetric KL" in out
    assert "label_smoothing: training loss = 0.8 * cross_entropy + 0.2 * mean over classes of -log p" in out
    assert "confidence_penalty: training loss -= 0.1 * entropy" in out


def test_a_custom_loss_function_is_not_taken_for_regression_by_the_step_methods(tmp_path):
    def my_cross_entropy(out, y):
        return F.cross_entropy(out, y)

    module = RegularizedModule(nn.Linear(4, 3), loss=my_cross_entropy, regularizers={"label_smoothing": {}},
                               example_input=torch.zeros(2, 4))
    assert module.step_task is None
    loss = module.training_step((torch.randn(8, 4), torch.randint(0, 3, (8,))), 0)
    assert loss is not None and loss > 0
    with pytest.raises(ConfigError, match=r"regularizers\.label_smoothing: acts on class probabilities"):
        RegularizedModule(nn.Linear(4, 1), loss="mse", regularizers={"label_smoothing": {}},
                          example_input=torch.zeros(2, 4)).training_step((torch.randn(8, 4), torch.randn(8, 1)), 0)
