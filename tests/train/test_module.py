"""RegularizedModule: regularizers applied at build time, checkpoints rebuild the same model."""
from __future__ import annotations

import re
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

from regfw.build.datasets import DigitsDataModule
from regfw.train.module import RegularizedModule

README = Path(__file__).resolve().parents[2] / "README.md"


def _trainer(tmp_path, **kw):
    args = dict(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=str(tmp_path))
    args.update(kw)
    return pl.Trainer(**args)


def test_checkpoint_round_trip_gives_identical_eval_outputs(tmp_path):
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(train_fraction=0.3, seed=0)
    module = RegularizedModule(
        loss="cross_entropy",
        regularizers={"dropout": {"hidden": 0.4}},
        n_examples=dm.n_train,
        example_input=dm.example_input(),
        model_config={"name": "cnn", "init_args": {"in_features": 64, "num_outputs": 10}},
    )
    trainer = _trainer(tmp_path, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)

    restored = RegularizedModule.load_from_checkpoint(path)
    names = lambda m: [n for n, _ in m.named_modules()]  # noqa: E731
    assert names(restored) == names(module)  # the same injected structure
    assert [r.row() for r in restored.plan.rows()] == [r.row() for r in module.plan.rows()]
    module.eval()
    restored.eval()
    x = dm.x_val[:64]
    assert torch.equal(module(x), restored(x))
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["regfw"]["regularizers"] == ["dropout"]


def test_injected_dropout_is_identity_in_eval_and_random_in_training():
    dm = DigitsDataModule(seed=0)
    module = RegularizedModule(model_config={"name": "mlp", "init_args": {"in_features": 64, "num_outputs": 10}},
                               regularizers={"dropout": {}}, n_examples=dm.n_train, example_input=dm.example_input())
    plain = RegularizedModule(model_config={"name": "mlp", "init_args": {"in_features": 64, "num_outputs": 10}},
                              regularizers={}, example_input=dm.example_input())
    plain.model.load_state_dict(module.model.state_dict())  # parameter names are unchanged by injection
    x = dm.x_val[:32]
    module.eval()
    plain.eval()
    assert torch.equal(module(x), plain(x))
    module.train()
    torch.manual_seed(0)
    a = module(x)
    b = module(x)
    assert not torch.equal(a, b)


def test_penalties_param_groups_and_callbacks_of_regularizers_are_used(tmp_path):
    from dataclasses import dataclass

    from regfw.extend.regularizer import Regularizer

    @dataclass
    class Cfg:
        weight: float = 0.5

    calls = []

    class Probe(Regularizer):
        name = "probe"
        Config = Cfg

        def penalty(self, model):
            return self.config.weight * sum((p ** 2).sum() for p in model.parameters())

        def param_groups(self, model):
            params = list(model.parameters())
            return [{"params": params[:1], "lr": 0.0}, {"params": params[1:]}]

        def callbacks(self):
            class Seen(pl.Callback):
                def on_train_start(self, trainer, pl_module):
                    calls.append("start")

            return [Seen()]

    net = nn.Sequential(nn.Linear(4, 3))
    module = RegularizedModule(net, regularizers=[Probe()], optimizer={"name": "sgd", "lr": 0.1})
    frozen = net[0].weight.detach().clone()
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    _trainer(tmp_path).fit(module, loader)
    assert calls == ["start"]
    assert torch.equal(net[0].weight, frozen)  # its group has lr 0
    # the penalty dominates: with weight 0.5 and lr 0.1 the bias shrinks towards 0
    assert module.trainer.callback_metrics["train_penalty"] > 0


def _readme_example() -> str:
    text = README.read_text()
    match = re.search(r"<!-- example: python-api -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md has no python-api example block"
    return match.group(1)


def test_readme_python_api_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_readme_example(), "README.md:python-api", "exec"), namespace)
    module = namespace["module"]
    assert any("regfw_" in name for name, _ in module.named_modules())
    assert namespace["trainer"].state.finished


def test_regression_with_predicted_variance_gets_full_mc_uncertainty(tmp_path):
    """Diabetes with `gaussian_nll`: the model predicts a mean and a variance; MC dropout reads
    both through the same split as the loss, so the predictive variance is aleatoric (predicted)
    plus epistemic (the spread of the sampled means)."""
    from regfw.config.schema import validate
    from regfw.run.job import fit

    cfg = validate({
        "data": {"name": "diabetes"},
        "model": {"name": "mlp", "loss": "gaussian_nll"},
        "regularizers": {"dropout": {"hidden": 0.3}},
        "uncertainty": {"samples": 10, "plots": False},
        "trainer": {"max_epochs": 2, "enable_progress_bar": False, "enable_model_summary": False},
        "run": {"dir": str(tmp_path)},
    })
    result = fit(cfg, quiet=True)
    m = result.metrics
    assert m["mc/mean_aleatoric"] > 0 and m["mc/mean_epistemic"] > 0
    assert abs(m["mc/mean_variance"] - (m["mc/mean_aleatoric"] + m["mc/mean_epistemic"])) < 1e-4 * m["mc/mean_variance"]
    assert 0 <= m["mc/coverage_90"] <= 1 and m["mc/rmse"] > 0
