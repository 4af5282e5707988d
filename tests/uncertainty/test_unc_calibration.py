"""Temperature scaling: known temperatures recovered, NLL not worse on held-out digits, inference mode."""
from __future__ import annotations

import math

import pytest
import torch
from unc_helpers import make_mlp, train_plain

from regfw.uncertainty import mc_predict
from regfw.uncertainty.calibration import Temperature, carve_calibration_split, fit_temperature, tempered_probs
from regfw.uncertainty.metrics import ece, nll

N = 20000
TOLERANCE = 0.05  # relative; with 20,000 labels the fitted temperature's spread is about 1%


def _categorical(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def test_overconfident_multiclass_temperature_recovered():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(N, 5, generator=gen) * 2.0  # the calibrated logits
    y = _categorical(torch.softmax(z, -1), gen)
    t = fit_temperature(2.5 * z, y)  # a model 2.5 times too sure
    assert t == pytest.approx(2.5, rel=TOLERANCE)
    before, after = nll(torch.softmax(2.5 * z, -1), y), nll(tempered_probs(2.5 * z, t, mc=False), y)
    assert after < before


@pytest.mark.parametrize("shape", ["[N]", "[N, 1]"])
def test_binary_single_logit_temperature_recovered(shape):
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(N, generator=gen) * 2.0
    y = (torch.rand(N, generator=gen) < torch.sigmoid(z)).long()
    logits = 3.0 * z if shape == "[N]" else (3.0 * z).unsqueeze(-1)
    t = fit_temperature(logits, y)
    assert t == pytest.approx(3.0, rel=TOLERANCE)
    # the transform used by mc_predict and rank gives sigmoid(z / T) as the positive class
    probs = torch.softmax(Temperature(t)((3.0 * z).unsqueeze(-1)), -1)
    assert torch.allclose(probs[:, 1], torch.sigmoid(3.0 * z / t), atol=1e-6)


def test_mc_predictive_temperature_recovered():
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(N, 4, generator=gen) * 2.0
    samples = z.unsqueeze(0) + 0.5 * torch.randn(8, N, 4, generator=gen)  # T = 8 stochastic passes
    y = _categorical(torch.softmax(samples, -1).mean(0), gen)  # labels from the calibrated MC predictive
    assert fit_temperature(2.0 * samples, y, mc=True) == pytest.approx(2.0, rel=TOLERANCE)


def _brute_force_temperature(z: torch.Tensor, y: torch.Tensor, mc: bool) -> tuple[float, float]:
    """The temperature of least NLL on a dense grid of log T over [0.01, 100] (2001 points), then on
    2001 points across two spacings around the best (a relative resolution of T of about 1e-5),
    computed from the definition: -mean log mean_t softmax(z_t / T)_y. Returns (T, its NLL)."""
    zs = (z if mc else z.unsqueeze(0)).double()

    def nlls(ts: torch.Tensor) -> torch.Tensor:
        out = []
        for chunk in ts.split(100):
            probs = torch.softmax(zs.unsqueeze(0) / chunk.view(-1, 1, 1, 1), dim=-1).mean(1)  # [G, N, C]
            out.append(-probs.gather(-1, y.view(1, -1, 1).expand(chunk.numel(), -1, 1)).log().mean((1, 2)))
        return torch.cat(out)

    log_ts = torch.linspace(math.log(0.01), math.log(100.0), 2001, dtype=torch.float64)
    best = int(nlls(log_ts.exp()).argmin())
    spacing = float(log_ts[1] - log_ts[0])
    fine = torch.linspace(max(float(log_ts[best]) - 2 * spacing, math.log(0.01)),
                          min(float(log_ts[best]) + 2 * spacing, math.log(100.0)), 2001, dtype=torch.float64)
    values = nlls(fine.exp())
    return float(fine[int(values.argmin())].exp()), float(values.min())


@pytest.mark.parametrize("mc", [False, True])
@pytest.mark.parametrize("labels", ["from a softer model", "at random", "always the least likely class"])
def test_fit_is_the_brute_force_minimum_of_the_nll(mc, labels):
    """The fitted temperature is the grid minimum of the NLL within its resolution (1e-4 relative),
    also where it lies at the MAX_TEMPERATURE bound (a model always wrong: the NLL keeps falling as
    T grows); the grid-only refinement that backs up the Newton steps finds the same point."""
    from regfw.uncertainty import calibration

    gen = torch.Generator().manual_seed(11)
    z = 3.0 * torch.randn(150, 4, generator=gen)
    if mc:
        z = z.unsqueeze(0) + 0.8 * torch.randn(12, 150, 4, generator=gen)
    if labels == "at random":
        y = torch.randint(0, 4, (150,), generator=gen)
    elif labels == "always the least likely class":
        y = z.amin(0).argmin(-1) if mc else z.argmin(-1)
    else:
        y = _categorical(torch.softmax((z.mean(0) if mc else z) / 1.7, -1), gen)
    expected, expected_nll = _brute_force_temperature(z, y, mc)
    if labels == "always the least likely class":
        assert expected == pytest.approx(100.0, rel=1e-9)
    fitted = fit_temperature(z, y, mc=mc)
    assert fitted == pytest.approx(expected, rel=1e-4)
    fitted_nll = -tempered_probs(z, fitted, mc).gather(-1, y.view(-1, 1)).log().mean().item()
    assert fitted_nll <= expected_nll + 1e-12
    zz = calibration.as_class_logits(z, mc).double()
    start = calibration._grid_start(zz, y)
    step = (math.log(calibration.MAX_TEMPERATURE) - math.log(calibration.MIN_TEMPERATURE)) / 24
    assert math.exp(calibration._minimise_log_t(zz, y, start, step)) == pytest.approx(expected, rel=1e-4)


def test_fits_inside_inference_mode_as_lightning_validation_runs():
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(2000, 3, generator=gen)
    y = _categorical(torch.softmax(z, -1), gen)
    outside = fit_temperature(2 * z, y)
    with torch.inference_mode():
        zi, yi = (2 * z).clone(), y.clone()  # inference tensors, as in a validation hook
        inside = fit_temperature(zi, yi)
    assert inside == pytest.approx(outside, rel=1e-9)


def test_bad_targets_named():
    with pytest.raises(ValueError, match=r"targets must be classes in \[0, 2\], got values in \[0, 7\]"):
        fit_temperature(torch.zeros(4, 3), torch.tensor([0, 1, 2, 7]))
    with pytest.raises(ValueError, match="3 inputs in logits but 2 targets"):
        fit_temperature(torch.zeros(3, 3), torch.tensor([0, 1]))


def test_digits_nll_after_not_worse_on_held_out_validation(digits):
    """Fit on a calibration split carved from the training data, judge on validation (seed 0)."""
    xtr, ytr, xv, yv = digits
    torch.manual_seed(0)
    model = train_plain(make_mlp(p=0.1, hidden=128), xtr[:1000], ytr[:1000], epochs=40, seed=0, lr=3e-3)
    xc, yc = xtr[1000:], ytr[1000:]  # 437 held out of training, never validation data
    cal = mc_predict(model, xc, samples=20, seed=0)
    val = mc_predict(model, xv, samples=20, seed=1)
    t_mc = fit_temperature(cal.outputs, yc, mc=True)
    t_det = fit_temperature(cal.deterministic, yc)
    assert val.deterministic is not None
    for logits, t, mc in ((val.outputs, t_mc, True), (val.deterministic, t_det, False)):
        before, after = tempered_probs(logits, 1.0, mc), tempered_probs(logits, t, mc)
        assert nll(after, yv) <= nll(before, yv) + 1e-9
        assert ece(after, yv) < 0.1
    assert t_mc > 1.0 and t_det > 1.0  # 40 epochs on 1,000 digits, little dropout: over-confident, so softened


def test_carve_takes_training_data_only():
    from regfw.build.datasets import DigitsDataModule

    dm = DigitsDataModule(seed=0)
    x_train, x_val, n = dm.x_train.clone(), dm.x_val.clone(), dm.n_train
    loader = carve_calibration_split(dm, 0.1, seed=0)
    cal = torch.cat([b[0] for b in loader])
    assert cal.shape[0] == round(0.1 * n) and dm.n_train == n - cal.shape[0] == dm.x_train.shape[0]
    rows = {tuple(r.tolist()) for r in x_train}
    assert all(tuple(r.tolist()) in rows for r in cal)  # from the training split
    assert torch.equal(dm.x_val, x_val)  # validation untouched
    kept = {tuple(r.tolist()) for r in dm.x_train}
    assert not any(tuple(r.tolist()) in kept for r in cal) or len(kept) < len(rows)  # removed from training
    with pytest.raises(ValueError, match="no calibration_dataloader"):
        carve_calibration_split(object(), 0.1, seed=0)


def test_no_errors_on_the_calibration_split_keeps_the_model_as_it_is():
    """All inputs right: the NLL falls as T -> 0 without a minimum; T = 1, with a warning."""
    z = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 4.0]])
    y = torch.tensor([0, 1, 2])
    with pytest.warns(RuntimeWarning, match="no minimum at a positive temperature"):
        assert fit_temperature(z, y) == 1.0
