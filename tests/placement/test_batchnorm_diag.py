"""Dropout and BatchNorm: the variance shift measured, ``regfw plan`` flagging dropout that feeds a
BatchNorm, regfw's own placement avoiding it, and Monte Carlo dropout keeping BatchNorm in eval.

Li, Chen, Hu & Yang, "Understanding the Disharmony between Dropout and Batch Normalization by
Variance Shift", CVPR 2019: a BatchNorm after dropout learns the variance of the *noisy* training
input as its running variance, and at inference (no noise) normalises by it anyway.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from regfw.cli.main import main
from regfw.layers import Dropout as RegfwDropout
from regfw.placement.plan import make_plan
from regfw.train.module import RegularizedModule
from regfw.uncertainty import mc_mode, mc_predict

SHIFT = "variance shift"


def _warnings(model: nn.Module, example: torch.Tensor, regularizers=()) -> list[str]:
    return make_plan(model, list(regularizers), example_input=example).warnings


def test_variance_shift_is_real():
    """x with mean 1 and variance 1 through inverted dropout (p = 0.5) then BatchNorm, trained until
    the running statistics settle: the training variance is Var(x) + p / (1 - p) E[x^2] = 1 + 2 = 3, so at
    inference BatchNorm's output has variance 1/3 instead of 1 (measured within 5%). With the dropout
    after the BatchNorm the inference variance is 1 (within 5%)."""
    torch.manual_seed(0)
    p = 0.5

    def settle(net: nn.Module) -> nn.Module:
        net.train()
        with torch.no_grad():
            for _ in range(100):
                net(1 + torch.randn(512, 8))
        return net.eval()

    before = settle(nn.Sequential(nn.Dropout(p), nn.BatchNorm1d(8, momentum=0.1)))
    after = settle(nn.Sequential(nn.BatchNorm1d(8, momentum=0.1), nn.Dropout(p)))
    x = 1 + torch.randn(20_000, 8)
    with torch.no_grad():
        shifted, fine = before(x).var(0).mean(), after(x).var(0).mean()
    expected = 1.0 / (1.0 + p / (1 - p) * 2.0)  # Var(x) = 1, E[x^2] = 2
    assert float(shifted) == pytest.approx(expected, rel=0.05)
    assert float(fine) == pytest.approx(1.0, rel=0.05)


def test_plan_flags_dropout_feeding_batchnorm_in_a_sequential():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.BatchNorm1d(16), nn.Linear(16, 2))
    text = make_plan(model, [], example_input=torch.zeros(4, 8)).format()
    assert ("warning: dropout '2' (Dropout) feeds BatchNorm '3' directly: the variance '3' sees in training "
            "differs from inference (variance shift, Li et al. 2019). Move the dropout after '3' and its "
            "activation.") in text


def test_plan_flags_it_in_nested_modules_custom_forwards_and_regfw_layers():
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 16)
            self.drop = RegfwDropout(0.3)  # a regfw StochasticModule, not torch's
            self.bn = nn.BatchNorm1d(16)
            self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.2), nn.BatchNorm1d(16), nn.Linear(16, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.bn(self.drop(self.fc(x))))

    flagged = _warnings(Custom(), torch.zeros(4, 8))
    assert any("dropout 'drop' (Dropout) feeds BatchNorm 'bn'" in w and SHIFT in w for w in flagged)
    assert any("dropout 'head.1' (Dropout) feeds BatchNorm 'head.2'" in w for w in flagged)
    assert len(flagged) == 2


def test_plan_is_quiet_when_dropout_comes_after_batchnorm():
    good = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))
    assert not [w for w in _warnings(good, torch.zeros(4, 8)) if SHIFT in w]


def test_regfw_inserts_dropout_after_the_batchnorm_and_its_activation():
    """Linear -> BatchNorm -> ReLU: the dropout regularizer hangs its module on the ReLU, never between
    the Linear and its BatchNorm, and the plan carries no variance-shift warning."""
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    module = RegularizedModule(model, regularizers={"dropout": {"hidden": 0.4, "input": 0}},
                               example_input=torch.zeros(4, 8))
    (row,) = module.plan.rows()
    assert (row.path, row.anchor, row.action) == ("0", "2", "after")
    assert not [w for w in module.plan.warnings if SHIFT in w]
    assert hasattr(model[2], "regfw_dropout") and not hasattr(model[0], "regfw_dropout")


def test_regfw_plan_command_prints_the_warning(tmp_path, capsys):
    """The printed `regfw plan` of a config whose model has Dropout -> BatchNorm (tests/models_zoo.py,
    importable because tests/ is on sys.path)."""
    config = tmp_path / "bn.yaml"
    config.write_text("data: {name: digits}\n"
                      "model: {class_path: models_zoo.DropoutBeforeBN, init_args: {width: 64}}\n"
                      "regularizers: {}\n")
    assert main(["plan", str(config)]) == 0
    out = capsys.readouterr().out
    assert "warning: dropout 'net.1' (Dropout) feeds BatchNorm 'net.2' directly" in out
    assert "Move the dropout after 'net.2' and its activation." in out


# -- Monte Carlo dropout keeps BatchNorm in eval -------------------------------------------------------


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
    model.train()
    with torch.no_grad():
        for _ in range(20):  # give BatchNorm non-trivial running statistics
            model(2 + 3 * torch.randn(64, 8))
    return model


def test_mc_mode_switches_dropout_on_and_keeps_batchnorm_in_eval():
    model = _bn_model().eval()
    seen: list[bool] = []
    model[1].register_forward_pre_hook(lambda m, args: seen.append(m.training))
    with mc_mode(model) as switched:
        assert switched == [model[3]]
        assert model[3].training and not model[1].training
        model(torch.randn(4, 8))
    assert seen == [False]
    assert not any(m.training for m in model.modules())  # flags restored


def test_mc_predict_leaves_batchnorm_statistics_untouched_and_uses_them():
    """400 samples of a single input row: BatchNorm's running statistics and batch counter are
    bit-identical afterwards, and the samples are normalised with the running statistics. Were
    BatchNorm in training mode, one row (or T identical copies of it) would be normalised to its
    bias and every sample would be the same; instead the samples spread, and their mean is the
    eval-mode output within 5 standard errors (inverted dropout keeps the expectation)."""
    model = _bn_model()
    bn = model[1]
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(1, 8)
    samples = 400
    result = mc_predict(model, x, samples=samples, seed=0)
    for key, value in bn.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert model.training and bn.training  # the caller's mode is restored
    outputs = result.outputs[:, 0]  # [T, 3] logits
    spread = outputs.std(0)
    assert float(spread.min()) > 1e-2
    with torch.no_grad():
        eval_out = model.eval()(x)[0]
    assert torch.all((outputs.mean(0) - eval_out).abs() < 5 * spread / samples ** 0.5)
