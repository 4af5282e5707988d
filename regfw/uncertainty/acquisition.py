"""Active learning with MC dropout (the library; the `regfw rank` command is :mod:`regfw.cli.rank`):
which unlabelled inputs are most worth labelling.

Acquisition functions (Gal, Islam & Ghahramani 2017, "Deep Bayesian Active Learning with
Image Data"):

* ``bald`` -- mutual information between prediction and weights (Houlsby et al. 2011): inputs
  the sampled models disagree on, where a label teaches the most about the weights;
* ``entropy`` -- predictive entropy (max entropy), total uncertainty;
* ``variation_ratio`` -- ``1 - `` the modal vote share;
* ``random`` -- the baseline, uniform scores from a generator seeded with ``seed``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, SequentialSampler

from regfw.tensors import to_device
from regfw.train.batch import batch_size, split_batch
from regfw.uncertainty.calibration import Temperature
from regfw.uncertainty.modes import require_stochastic
from regfw.uncertainty.rng import derive_seed
from regfw.uncertainty.sampling import (
    DEFAULT_BUDGET_BYTES,
    _check_samples,
    mc_predict,
)
from regfw.uncertainty.summaries import per_input

__all__ = ["ACQUISITIONS", "Ranked", "acquisition_scores", "rank"]

#: Acquisition names and the summary score each uses (None: random).
ACQUISITIONS: dict[str, str | None] = {
    "bald": "mutual_information",
    "entropy": "entropy",
    "variation_ratio": "variation_ratio",
    "random": None,
}


class Ranked(NamedTuple):
    """The inputs to label first: dataset indices and their acquisition scores, best first."""

    indices: Tensor  #: ``[k]`` int64 positions in the dataloader's dataset order
    scores: Tensor  #: ``[k]`` acquisition scores (nats for bald/entropy)


def _check_in_order(dataloader: Iterable[Any]) -> None:
    """Raise unless ``dataloader`` yields its dataset in order (so positions are indices)."""
    if not isinstance(dataloader, DataLoader):
        return  # a plain iterable of batches: its order is the order
    if isinstance(dataloader.dataset, IterableDataset):
        return
    samplers = [dataloader.sampler, getattr(dataloader.batch_sampler, "sampler", None)]
    for s in samplers:
        if s is not None and not isinstance(s, SequentialSampler):
            raise ValueError(
                "rank needs a DataLoader that visits its dataset in order, so that positions are "
                f"dataset indices, but its sampler is {type(s).__name__}. Fix: build it with "
                "shuffle=False and no custom sampler, e.g. DataLoader(dataset, batch_size=..., shuffle=False)."
            )


def _default_input(batch: Any) -> Any:
    """The inputs of ``batch`` by the one batch convention (:func:`regfw.train.batch.split_batch`): ``x``,
    ``(x, ...)``, or a dict of keyword inputs (its label keys left out)."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (list, tuple, dict)) and batch:
        return split_batch(batch)[0]
    raise TypeError(
        f"cannot find the input in a batch of type {type(batch).__name__}; batches must be a tensor, "
        "an (x, ...) tuple or a dict of keyword inputs, or pass batch_to_input=callable"
    )


def _model_device(model: nn.Module) -> torch.device | None:
    for t in model.parameters():
        return t.device
    for b in model.buffers():
        return b.device
    return None


def acquisition_scores(
    model: nn.Module,
    dataloader: Iterable[Any],
    acquisition: str = "bald",
    samples: int = 20,
    seed: int | None = 0,
    *,
    strategy: str = "auto",
    budget_bytes: int | None = DEFAULT_BUDGET_BYTES,
    batch_to_input: Callable[[Any], Tensor] | None = None,
    temperature: float | None = None,
) -> Tensor:
    """The acquisition score of every input, ``[N]`` in dataset order (higher = label first).

    Dense outputs (``[B, C, H, W]`` segmentation, ``[B, L, V]`` sequences) score each input by
    the mean of its per-position scores.

    ``temperature`` (fitted by :func:`regfw.uncertainty.calibration.fit_temperature`, saved in
    ``regfw fit`` checkpoints) divides the logits before the softmax, so the scores are those of
    the calibrated predictive.
    """
    if acquisition not in ACQUISITIONS:
        raise ValueError(f"acquisition must be one of {list(ACQUISITIONS)}, got {acquisition!r}")
    _check_in_order(dataloader)
    score_name = ACQUISITIONS[acquisition]
    base = seed if seed is not None else int(torch.Generator().seed() % 2**62)
    if score_name is None:
        n = None
        dataset = getattr(dataloader, "dataset", None)
        if dataset is not None and not isinstance(dataset, IterableDataset):
            try:
                n = len(dataset)
            except TypeError:
                n = None
        if n is None:
            get = batch_to_input or _default_input
            n = sum(batch_size(get(b)) for b in dataloader)
        gen = torch.Generator().manual_seed(derive_seed(base, 0x52414E44))
        return torch.rand(n, generator=gen, dtype=torch.float64)
    _check_samples(samples)
    require_stochastic(model)
    device = _model_device(model)
    get = batch_to_input or _default_input
    out: list[Tensor] = []
    for i, batch in enumerate(dataloader):
        x = get(batch)
        if device is not None:
            x = to_device(x, device)
        result = mc_predict(
            model, x, samples=samples, strategy=strategy, budget_bytes=budget_bytes,
            seed=derive_seed(base, i), task="classification", deterministic=False,
            output_transform=None if temperature is None else Temperature(float(temperature)),
        )
        score = result.score(score_name).detach().double().cpu()
        out.append(per_input(score) if score.dim() > 1 else score)  # dense: one score per image / sequence
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def rank(
    model: nn.Module,
    dataloader: Iterable[Any],
    acquisition: str = "bald",
    k: int = 10,
    samples: int = 20,
    seed: int | None = 0,
    *,
    strategy: str = "auto",
    budget_bytes: int | None = DEFAULT_BUDGET_BYTES,
    batch_to_input: Callable[[Any], Tensor] | None = None,
    temperature: float | None = None,
) -> Ranked:
    """The ``k`` inputs of ``dataloader`` most worth labelling, by ``acquisition``.

    Args:
        model: a classifier returning logits, with dropout (or another stochastic module).
        dataloader: yields ``x`` or ``(x, ...)`` batches in dataset order (``shuffle=False``;
            a shuffling DataLoader is an error, since positions would not be indices).
        acquisition: ``"bald"``, ``"entropy"``, ``"variation_ratio"`` or ``"random"``.
        k: how many to return (at most the dataset size).
        samples: MC samples T per input.
        seed: seeds the masks (and the random baseline); None = fresh randomness.
        temperature: a fitted temperature; the scores are then those of the calibrated model.

    Returns:
        :class:`Ranked` ``(indices, scores)``, highest score first; among equal scores the
        lower index comes first. The global RNG is not used.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got k={k!r}")
    scores = acquisition_scores(
        model, dataloader, acquisition, samples, seed,
        strategy=strategy, budget_bytes=budget_bytes, batch_to_input=batch_to_input, temperature=temperature,
    )
    order = torch.sort(scores, descending=True, stable=True).indices[: min(k, scores.numel())]
    return Ranked(indices=order, scores=scores[order])
