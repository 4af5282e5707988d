"""The floating-point noise between batch sizes, measured by the test that compares across them.

The Monte Carlo strategies run one network at different batch sizes: ``loop`` runs the B input rows
per pass, ``batched`` T x B rows (in chunks), ``auto`` a deterministic prefix at B rows and the rest
at T x B rows. Matrix and convolution kernels choose their blocking, and so the order of their sums,
by the shape and by the CPU (``ATEN_CPU_CAPABILITY``: default, avx2, avx512, AMX), so the same
deterministic model gives results that differ in the last bits between batch sizes, by an amount
that depends on the machine: bitwise equal on one CPU, 5e-7 apart in a ConvNeXt's probabilities on
another. A statistical comparison of strategies (a z test of means, a ratio of spreads, a
tolerance) tests the strategies only where the spread it compares is far above that noise;
otherwise it tests the CPU's kernels, and fails on some machines and not on others.

So such a test first measures the floor on its own model and inputs (:func:`batch_noise_floor`),
then asserts that its spread is at least :data:`FACTOR` times above it (:func:`far_above_floor`),
and only then compares.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from regfw.model_io import model_output
from regfw.tensors import iter_tensors
from regfw.train.batch import batch_size, index_batch

#: How far above the floor a compared spread must be: at 100x, floating-point noise moves a z
#: statistic by at most 0.01 and a ratio of spreads by at most 1%.
FACTOR = 100.0

Quantity = Callable[[torch.Tensor], torch.Tensor]


def batch_noise_floor(model: nn.Module, inputs: Any, rows: int | Iterable[int],
                      quantity: Quantity | None = None) -> float:
    """The largest ``|difference|`` of ``quantity`` between running ``inputs`` (B rows) as one batch
    and inside a batch of ``rows`` rows (each size given; row i of it is input row ``i mod B``),
    the model deterministic (eval mode, no gradient; its modes are restored afterwards; asserted by
    a second pass at B rows).

    ``quantity`` maps a stack of outputs ``[S, B', ...]`` to what the test compares (e.g. softmax
    probabilities after the entry's output transform); the identity by default.

    ``inputs`` may also be a dict of keyword arguments or a tuple of positional arguments (every
    tensor with B rows is repeated, as the ``batched`` strategy does) and the model may return a
    ``ModelOutput`` (its ``logits`` are compared: :func:`regfw.model_io.select_output`).

    The floor is at least one unit in the last place of the largest compared value (the float
    epsilon of the model's output dtype times it): kernels that agree bitwise on this CPU may not on
    the next, and a spread that is only far above an exact zero holds nowhere else.
    """
    sizes = [rows] if isinstance(rows, int) else list(rows)
    measure = quantity if quantity is not None else (lambda out: out)
    batch = batch_size(inputs)
    device = next(iter_tensors(inputs)).device
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            alone = model_output(model, inputs)
            assert torch.equal(model_output(model, inputs), alone), (
                "the model gives another output on a second eval-mode pass: the noise floor between batch sizes "
                "needs a deterministic model (measure it on the same layers without the random function)")
            worst = 0.0
            for n in sizes:
                index = torch.arange(n, device=device) % batch
                among = model_output(model, index_batch(inputs, index, batch))
                diff = measure(among.unsqueeze(0)).double() - measure(alone[index].unsqueeze(0)).double()
                worst = max(worst, float(diff.abs().max()))
            largest = float(measure(alone.unsqueeze(0)).double().abs().max())
    finally:
        for module, training in modes:
            module.train(training)
    return max(worst, torch.finfo(alone.dtype).eps * largest)


def far_above_floor(spread: torch.Tensor, floor: float, what: str, factor: float = FACTOR,
                    share: float = 1.0) -> torch.Tensor:
    """The entries of ``spread`` at least ``factor`` times ``floor`` (a boolean mask), asserting that
    they are at least ``share`` of all entries (every one by default).

    ``what`` names the spread in the failure message, which says that a comparison at this spread
    would measure floating-point noise, not the strategies.
    """
    values = spread.detach().double()
    above = values >= factor * floor
    n, total = int(above.sum()), values.numel()
    assert total > 0 and n >= share * total, (
        f"{what} is not far above the floating-point noise between batch sizes: {n} of {total} entries are "
        f">= {factor:g} x the floor {floor:.2g} (median {float(values.median()):.2g}; needed {share:.0%} of them). "
        "A comparison at this spread would measure the CPU's kernels (ATEN_CPU_CAPABILITY), not the strategies; "
        "give the test's model or inputs a larger spread")
    return above
