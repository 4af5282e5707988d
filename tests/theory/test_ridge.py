"""Claim 5: for linear regression, dropout on the inputs is ridge regression in expectation.

Srivastava et al. 2014, section 9.1; Wager, Wang & Liang, "Dropout Training as Adaptive
Regularization", NeurIPS 2013. With inverted dropout X̃ = (M ⊙ X) / (1 - p), M_ij ~ Bernoulli(1 - p):
row i gives X̃_i w with mean X_i w and variance p / (1 - p) Σ_j x_ij² w_j², so

    E ||y - X̃ w||²  =  ||y - X w||²  +  λ wᵀ diag(XᵀX) w,     λ = p / (1 - p),

a ridge penalty whose weight per feature is that feature's squared norm. Its minimiser is
w* = (XᵀX + λ diag(XᵀX))⁻¹ Xᵀ y.
"""
from __future__ import annotations

import pytest
import torch

from regfw.layers import dropout

from .masks import all_masks, mask_probs

P = 0.3


def _problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.5, 1.0, 2.0, 1.0, 3.0], dtype=torch.float64)
    x = torch.randn(20, 5, generator=g, dtype=torch.float64) * scale
    w_true = torch.randn(5, generator=g, dtype=torch.float64)
    y = x @ w_true + 0.1 * torch.randn(20, generator=g, dtype=torch.float64)
    w = torch.randn(5, generator=g, dtype=torch.float64)
    return x, y, w


def closed_form(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, p: float) -> torch.Tensor:
    lam = p / (1 - p)
    return ((y - x @ w) ** 2).sum() + lam * (w ** 2 * (x ** 2).sum(0)).sum()


def exact_expected_loss(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, p: float) -> torch.Tensor:
    """E over masks, exactly: rows are independent, so sum per row the 2^5 masks of that row."""
    masks = all_masks(x.shape[1])  # [32, 5]
    probs = mask_probs(masks, p)
    pred = (masks[:, None, :] * x / (1 - p)) @ w  # [32, rows]
    return (probs[:, None] * (y - pred) ** 2).sum()


def ridge_solution(x: torch.Tensor, y: torch.Tensor, p: float) -> torch.Tensor:
    lam = p / (1 - p)
    gram = x.T @ x
    return torch.linalg.solve(gram + lam * torch.diag(gram.diagonal()), x.T @ y)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.6])
def test_expected_dropout_loss_equals_ridge_exactly(p):
    """Enumerating every mask of every row gives the closed form to 1e-10."""
    x, y, w = _problem()
    assert float(exact_expected_loss(x, y, w, p)) == pytest.approx(float(closed_form(x, y, w, p)), rel=1e-10)


def test_monte_carlo_dropout_loss_matches_closed_form():
    """20,000 draws of the project's dropout on X: the mean loss is within 4 standard errors of the
    closed form (standard error = sample std / sqrt(draws); here about 0.4% of the value), and
    the penalty is what separates it from the plain loss."""
    torch.manual_seed(0)
    x, y, w = _problem()
    draws = 20_000
    noisy = dropout(x.expand(draws, *x.shape), P, training=True)  # a fresh mask per draw
    losses = ((y - noisy @ w) ** 2).sum(-1)
    se = float(losses.std()) / draws ** 0.5
    target = float(closed_form(x, y, w, P))
    assert abs(float(losses.mean()) - target) < 4 * se
    plain = float(((y - x @ w) ** 2).sum())
    assert target - plain > 20 * se  # the ridge term is far larger than the Monte Carlo error


def test_ridge_solution_minimises_the_expected_dropout_loss():
    """The gradient of the exact expected dropout loss vanishes at w* (to 1e-9), and w* differs from
    least squares: dropout shrinks the weights, most those of the high-norm features."""
    x, y, _ = _problem()
    w_star = ridge_solution(x, y, P).requires_grad_(True)
    (grad,) = torch.autograd.grad(exact_expected_loss(x, y, w_star, P), w_star)
    assert float(grad.abs().max()) < 1e-9
    w_ols = torch.linalg.lstsq(x, y).solution
    assert float((w_star.detach() - w_ols).abs().max()) > 1e-2
    assert float(w_star.detach().norm()) < float(w_ols.norm())
