"""What a regfw fit prints while Lightning trains: a progress bar on a terminal, nothing else.

``regfw fit`` and ``regfw demo`` end with one summary of their own; on the way there Lightning
would add lines that say nothing about the run: an advert for its cloud services on every
``Trainer`` (its "💡 Tip" lines), which accelerators exist on a CPU run, why ``Trainer.fit``
stopped, warnings about code inside Lightning (``isinstance(treespec, LeafSpec)`` is deprecated
in torch's pytree) and advice that does not apply to the data at hand (DataLoader workers for a
data set held in memory as tensors). :func:`quiet_lightning` drops exactly those, each by its
message and the Lightning module that emits it, only while regfw's own fit runs; the filters
that were in place before (a library user's own) are put back unchanged. Every other warning and
log record passes.

What regfw can decide itself it decides instead of silencing: the settings below apply when the
config's ``trainer:`` section leaves them out.

* ``enable_progress_bar``: on when standard output is a terminal, off when it is a pipe or a
  file (a progress bar written into a log is thousands of carriage returns);
* ``enable_model_summary``: off (``plan.txt`` in the run directory names every layer regfw
  changed; ``trainer.enable_model_summary: true`` prints Lightning's table);
* ``log_every_n_steps``: 10, or the number of training batches per epoch when an epoch has
  fewer (Lightning warns when the interval is longer than an epoch, and then logs no step).
"""
from __future__ import annotations

import contextlib
import logging
import math
import re
import sys
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

#: Lightning's two package names (``pytorch_lightning`` and ``lightning.pytorch``), and Fabric's.
_LIGHTNING = r"(pytorch_lightning|lightning\.pytorch|lightning_fabric|lightning\.fabric)"

#: (message, module) of the warnings dropped during a fit: both regular expressions, matched as
#: :func:`warnings.filterwarnings` does (the message from its start, the module whole).
WARNINGS: tuple[tuple[str, str, type[Warning]], ...] = (
    # torch deprecated a check Lightning's pytree helper still makes; nothing a user can change
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", _LIGHTNING + r"\.utilities\._pytree", FutureWarning),
)

#: Dropped only when the training data are tensors in memory: then a DataLoader worker process
#: copies what the main process already holds, and Lightning's advice to add workers slows
#: the run down.
IN_MEMORY_WARNINGS: tuple[tuple[str, str, type[Warning]], ...] = (
    (r"The '\w+' does not have many workers", _LIGHTNING + r"(\..*)?", Warning),
)

#: Lightning's informational lines dropped during a fit (matched from the start of the message).
INFO_LINES = re.compile(
    r"💡 Tip:"  # adverts for Lightning's cloud products (litlogger, litmodels)
    r"|(GPU|TPU|HPU|IPU|MPS) available:"  # which accelerators exist; the config says which one is used
    r"|`Trainer\.(fit|validate|test|predict)` stopped:"  # the summary says how many epochs ran
)

#: The loggers Lightning's rank-zero lines come from (each namespace has its own).
_INFO_LOGGERS = tuple(f"{ns}.utilities.rank_zero" for ns in
                      ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"))

#: Training steps between two logged values when the config does not say.
LOG_EVERY_N_STEPS = 10


class _DropLines(logging.Filter):
    """Drops the :data:`INFO_LINES` records (and nothing else) of the logger it is added to."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.INFO and INFO_LINES.match(str(record.msg).lstrip()))


@contextlib.contextmanager
def quiet_lightning(*, in_memory: bool = False) -> Iterator[None]:
    """Drop Lightning's adverts, accelerator and stop lines, and the warnings of :data:`WARNINGS`
    (and :data:`IN_MEMORY_WARNINGS` when ``in_memory``) while the block runs; restore after."""
    drop = _DropLines()
    loggers = [logging.getLogger(name) for name in _INFO_LOGGERS]
    with warnings.catch_warnings():  # the caller's filters come back unchanged on exit
        for message, module, category in WARNINGS + (IN_MEMORY_WARNINGS if in_memory else ()):
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
        for logger in loggers:
            logger.addFilter(drop)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(drop)


def on_terminal() -> bool:
    """Whether standard output is a terminal (a progress bar is drawn only there)."""
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


def holds_tensors(datamodule: Any) -> bool:
    """Whether the training data are tensors in memory (a ``TensorDataset``): DataLoader workers
    then add process start-up and copying, never speed."""
    from torch.utils.data import TensorDataset

    try:
        return isinstance(datamodule.train_dataloader().dataset, TensorDataset)
    except Exception:  # noqa: BLE001 - a user's data module may not be ready yet; then nothing is assumed
        return False


def batches_per_epoch(datamodule: Any, processes: int, limit: Any = None) -> int | None:
    """Training batches each process runs per epoch, or None where the loader has no length."""
    try:
        n = len(datamodule.train_dataloader())
    except Exception:  # noqa: BLE001 - an iterable loader, or a data module that is not ready
        return None
    n = math.ceil(n / max(1, processes))
    if isinstance(limit, bool) or limit is None:
        return n
    if isinstance(limit, int):
        return min(n, limit)
    if isinstance(limit, float):
        return max(1, int(n * limit)) if limit > 0 else n
    return n


def trainer_defaults(trainer: Mapping[str, Any], datamodule: Any, processes: int) -> dict[str, Any]:
    """The console settings the ``trainer:`` section leaves to regfw (see the module docstring)."""
    chosen: dict[str, Any] = {}
    if "enable_progress_bar" not in trainer:
        chosen["enable_progress_bar"] = on_terminal()
    if "enable_model_summary" not in trainer:
        chosen["enable_model_summary"] = False
    if "log_every_n_steps" not in trainer:
        batches = batches_per_epoch(datamodule, processes, trainer.get("limit_train_batches"))
        chosen["log_every_n_steps"] = max(1, min(LOG_EVERY_N_STEPS, batches or LOG_EVERY_N_STEPS))
    return chosen
