"""Non-finite inputs to ``regfw predict`` and ``regfw rank``: refused before any model runs, naming the rows.

A NaN or infinite feature has no prediction and no uncertainty: a model turns it into NaN
probabilities (and ``argmax`` into class 0), which no referral rule can compare, so such a row
would drop silently out of human review. Both commands therefore make one pass over their
inputs first and refuse them with the rows at fault (dataset positions, as in the commands'
output) and how to fix the data. A row whose inputs are finite but whose model output is not
is a different matter, the model's; :func:`regfw.cli.predict.prediction_rows` refers it for review
with its reason, and ``regfw rank`` lists it as referred.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from regfw.errors import ConfigError
from regfw.tensors import iter_tensors
from regfw.train.batch import BatchFormat, batch_size, split_batch

#: How many row positions a message lists before counting the rest.
SHOWN_ROWS = 10


def nonfinite_rows(loader: Iterable[Any], batch_format: BatchFormat | None = None) -> tuple[list[int], int]:
    """The dataset positions of the rows of ``loader`` whose inputs hold a NaN or an infinity, and
    the number of rows in all (floating-point inputs only: integer ones are always finite)."""
    bad: list[int] = []
    start = 0
    for batch in loader:
        inputs = batch if isinstance(batch, torch.Tensor) else split_batch(batch, batch_format)[0]
        batch_like = isinstance(inputs, (torch.Tensor, dict, tuple))
        tensors = [t for t in iter_tensors(inputs) if t.dim() > 0] if batch_like else []
        if not tensors:
            return bad, start  # not a batch of tensors (a list of images): the model decides what it accepts
        n = batch_size(inputs)  # a dict of keyword inputs: a row is bad when any of its float tensors is
        finite = torch.ones(n, dtype=torch.bool)
        for t in tensors:
            if t.shape[0] == n and (t.is_floating_point() or t.is_complex()):
                finite &= torch.isfinite(t.reshape(n, -1)).all(dim=1).cpu()
        bad += (torch.nonzero(~finite).flatten() + start).tolist()
        start += n
    return bad, start


def format_rows(rows: Sequence[int]) -> str:
    """``3, 17, 40`` (the first :data:`SHOWN_ROWS` and how many more)."""
    shown = ", ".join(str(r) for r in rows[:SHOWN_ROWS])
    return shown + (f" and {len(rows) - SHOWN_ROWS} more" if len(rows) > SHOWN_ROWS else "")


def refuse_nonfinite(loader: Iterable[Any], *, what: str, data: str, batch_format: BatchFormat | None = None) -> None:
    """Raise a :class:`~regfw.errors.ConfigError` naming the rows of ``loader`` (``what``: the
    split, ``data``: the data set's name) with non-finite inputs; nothing when all are finite."""
    bad, total = nonfinite_rows(loader, batch_format)
    if bad:
        raise ConfigError(f"data {data!r}: {len(bad)} of the {total} inputs of the {what} split hold NaN or infinite "
                          f"values (rows {format_rows(bad)}); regfw cannot predict or score them. Remove or impute "
                          f"those rows (row = position in the split) and run again.", key="data")
