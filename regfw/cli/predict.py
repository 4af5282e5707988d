"""Predictions with uncertainty: ``Trainer.predict`` with MC dropout, and the table a person reviews.

Lightning switches the model to eval mode for ``Trainer.predict``, which turns dropout off.
:class:`MCDropoutPredict` makes each ``predict_step`` (wrapped from ``on_predict_start`` until
``on_predict_end``) a Monte Carlo prediction instead: :func:`regfw.uncertainty.mc_predict`
switches only the stochastic modules back on for its samples (BatchNorm stays in eval) and
restores every mode afterwards, so eval mode does not silence it. Each batch's prediction is a
dict of per-input tensors: the prediction, the mean class probabilities (classification) or the
mean and variance (regression), and the uncertainty scores.

:func:`prediction_rows` turns them into one row per input with the human-review decision of the
referral rule (refer when the score exceeds ``threshold``, or the ``refer_fraction`` most
uncertain inputs), and :func:`write_table` writes them as CSV (Parquet for a ``.parquet`` path
when pyarrow is installed): the list a person works through. ``regfw predict`` does all of it
for a checkpoint.

Nothing uncertain escapes review silently: inputs holding NaN or infinity are refused by row
before the model runs (:mod:`regfw.cli.finite_inputs`, as for ``regfw rank``), and a row whose model
output is not finite is referred with the ``reason`` ``non-finite model output``.
"""
from __future__ import annotations

import contextlib
import csv
import math
import types
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from regfw.errors import ConfigError, RegfwError
from regfw.model_io import OutputKey, check_output_key, describe_output
from regfw.train.batch import BatchFormat, split_batch

__all__ = ["MCDropoutPredict", "prediction_rows", "write_table"]


class MCDropoutPredict(pl.Callback):
    """Monte Carlo dropout for ``Trainer.predict`` on any LightningModule with dropout.

    Args:
        samples: MC samples T per input.
        task: ``"classification"`` or ``"regression"``.
        score: the referral score (default: mutual information / variance), see
            :class:`~regfw.uncertainty.MCDropoutUncertainty`.
        strategy, budget_bytes, tau, output_transform, output_key: as for
            :func:`regfw.uncertainty.mc_predict`.
        seed: base seed of the masks (mixed with the rank, dataloader and batch index).
        batch: where the inputs sit in a batch (a :class:`~regfw.train.batch.BatchFormat`); batches
            may carry targets, which are ignored; a dict batch gives the model its keyword inputs
            (the dict minus its label keys, :mod:`regfw.train.batch`).
    """

    def __init__(self, samples: int = 30, task: str = "classification", score: str | None = None,
                 strategy: str = "auto", budget_bytes: int | None = None, seed: int = 0, tau: float | None = None,
                 output_transform: Any = None, batch: BatchFormat | Mapping[str, Any] | None = None,
                 output_key: OutputKey = None) -> None:
        super().__init__()
        from regfw.uncertainty.callback import CLASSIFICATION_SCORES, REGRESSION_SCORES

        allowed = CLASSIFICATION_SCORES if task == "classification" else REGRESSION_SCORES
        self.score = score or ("mutual_information" if task == "classification" else "variance")
        if self.score not in allowed:
            raise ConfigError(f"uncertainty.score: got {self.score!r}, expected one of {', '.join(allowed)} for "
                              f"task {task!r}.")
        self.samples, self.task, self.strategy, self.seed, self.tau = samples, task, strategy, int(seed), tau
        self.budget_bytes, self.output_transform = budget_bytes, output_transform
        self.batch_format = BatchFormat.coerce(batch)
        self.output_key = check_output_key(output_key)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        callback = self

        def predict_step(module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict:
            return callback.predict_batch(module, batch, batch_idx, dataloader_idx, trainer.global_rank)

        pl_module.predict_step = types.MethodType(predict_step, pl_module)  # type: ignore[method-assign]

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.__dict__.pop("predict_step", None)

    def predict_batch(self, model: torch.nn.Module, batch: Any, batch_idx: int = 0, dataloader_idx: int = 0,
                      rank: int = 0) -> dict[str, Tensor]:
        """The MC prediction of one batch as per-input tensors (``score`` is the referral score)."""
        from regfw.uncertainty import mc_predict
        from regfw.uncertainty.sampling import derive_seed

        inputs = batch if isinstance(batch, Tensor) else split_batch(batch, self.batch_format)[0]
        result = mc_predict(model, inputs, samples=self.samples, strategy=self.strategy,
                            budget_bytes=self.budget_bytes,
                            seed=derive_seed(self.seed, rank, dataloader_idx, batch_idx),
                            task=self.task, tau=self.tau, output_transform=self.output_transform,
                            output_key=self.output_key)
        s: Any = result.summary
        if self.task == "classification":
            out = {"prediction": s.prediction, "mean_probs": s.mean_probs, "entropy": s.predictive_entropy,
                   "mutual_information": s.mutual_information, "variation_ratio": s.variation_ratio}
        else:
            out = {"mean": s.mean, "variance": s.variance, "aleatoric": s.aleatoric, "epistemic": s.epistemic}
        out["score"] = s.score(self.score)
        return {k: v.detach().cpu() for k, v in out.items()}


#: The ``reason`` of a row whose model output holds a NaN or an infinity (its inputs were finite).
NONFINITE_OUTPUT = "non-finite model output"


def prediction_rows(predictions: Sequence[Mapping[str, Tensor]], score: str, threshold: float | None = None,
                    refer_fraction: float = 0.1) -> list[dict[str, Any]]:
    """One row per input (in order) from :class:`MCDropoutPredict`'s batch outputs, with ``refer``:
    the score exceeds ``threshold``, or (no threshold) the input is among the ``refer_fraction``
    most uncertain (ties broken by order), and ``reason``, why a row is referred (empty when it
    is not).

    A row whose outputs hold a NaN or an infinity (the model's: the inputs are checked before)
    has no score to compare; it is always referred, with the reason :data:`NONFINITE_OUTPUT`,
    and the fraction is taken of the other rows.
    """
    if not predictions:
        return []
    cat = {k: torch.cat([p[k] for p in predictions]) for k in predictions[0]}
    scores = cat["score"].double()
    n = len(scores)
    finite = torch.ones(n, dtype=torch.bool)
    for value in cat.values():
        if value.is_floating_point():
            finite &= torch.isfinite(value.reshape(n, -1)).all(dim=1)
    if threshold is not None:
        refer = finite & (scores > threshold)
        rule = f"{score} > {threshold:g}"
    else:
        usable = torch.nonzero(finite).flatten()
        k = min(len(usable), math.ceil(refer_fraction * len(usable) - 1e-9))
        refer = torch.zeros(n, dtype=torch.bool)
        if k:
            refer[usable[torch.argsort(-scores[usable], stable=True)[:k]]] = True
        rule = f"top {refer_fraction:g} by {score}"
    rows = []
    for i in range(n):
        row: dict[str, Any] = {"index": i}
        for key, value in cat.items():
            v = value[i]
            if key == "score":
                continue
            if v.dim() == 0:
                row[key] = v.item()
            else:
                prefix = "prob" if key == "mean_probs" else key
                for j, item in enumerate(v.reshape(-1).tolist()):
                    row[f"{prefix}_{j}" if v.numel() > 1 or key == "mean_probs" else key] = item
        row["score"] = float(scores[i])
        row["refer"] = bool(refer[i]) or not bool(finite[i])
        row["reason"] = NONFINITE_OUTPUT if not finite[i] else (rule if refer[i] else "")
        row["rule"] = rule
        rows.append(row)
    return rows


def write_table(rows: Sequence[Mapping[str, Any]], path: str | Path, *, force: bool = False) -> Path:
    """Write ``rows`` to ``path``: Parquet for ``.parquet`` (needs pyarrow), else CSV; atomically,
    never over anything but a regular file, and over an existing file only with ``force``
    (:func:`regfw.run.atomic.write_output`)."""
    from regfw.run.atomic import write_output

    path = Path(path)
    columns = list(rows[0]) if rows else ["index"]
    if path.suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError(f"--out {str(path)!r}: writing Parquet needs pyarrow, which is not installed; "
                              f"pip install pyarrow, or write a .csv file.") from None
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({c: [r[c] for r in rows] for c in columns}), sink)
        return write_output(path, sink.getvalue().to_pybytes(), force=force)
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return write_output(path, buf.getvalue(), force=force)


def check_out(out: str | Path, *, force: bool, inputs: Sequence[str | Path] = ()) -> Path:
    """Refuse ``--out`` before any work: a path where regfw must not write (see
    :func:`regfw.run.atomic.check_target`), or one of the command's own ``inputs`` (the config, the
    checkpoint), which ``--force`` does not replace either."""
    import os

    from regfw.errors import OutputError
    from regfw.run.atomic import check_target

    path = Path(out)
    if not str(out).strip():
        raise OutputError("--out: got an empty path; give the table to write, e.g. --out predictions.csv.")
    check_target(path, replace=force)  # first: it also refuses what os.stat cannot look at (a name too long)
    for given in inputs:
        if path.exists() and Path(given).exists() and os.path.samefile(path, given):
            raise OutputError(f"--out {str(path)!r} is the command's own input {str(given)!r}; regfw never writes "
                              f"over it, not even with --force. Choose another path for the table.")
    return path


def predict_checkpoint(config: str, checkpoint: str, overrides: Sequence[str] = (), *, out: str,
                       split: str = "val", samples: int | None = None,
                       force: bool = False) -> tuple[Path, list[dict[str, Any]]]:
    """``regfw predict``: MC predictions of a checkpoint on the config's data (the data module's
    ``predict_dataloader`` when it has one, else the ``split``; regression predictions in the
    targets' original units when the data declares its scaling and ``uncertainty.units`` is
    ``original``, the default), written to ``out`` (an existing
    regular file only with ``force``, see :func:`check_out`). Inputs with NaN or infinite values
    are refused by row (:mod:`regfw.cli.finite_inputs`) before the model runs."""
    from regfw.build.factory import build_datamodule
    from regfw.cli.finite_inputs import refuse_nonfinite
    from regfw.cli.rank import check_samples, load_module
    from regfw.config.schema import load_config
    from regfw.run import stopping
    from regfw.train.losses import mc_output_transform
    from regfw.train.targets import declared_scaling, original_units_transform

    check_samples(samples)
    check_out(out, force=force, inputs=(config, checkpoint))
    cfg = load_config(config, overrides)
    unc = cfg.uncertainty
    datamodule = build_datamodule(cfg.data, seed=cfg.seed)
    data_name = str(cfg.data.name or cfg.data.class_path)
    if split == "predict" and not _has_own(datamodule, "predict_dataloader"):
        raise ConfigError(f"--split predict: the data {data_name!r} has no predict_dataloader(); use --split val "
                          f"or --split train, or a data module that defines predict_dataloader().", key="data")
    module = load_module(checkpoint)
    task = getattr(module, "task", None) or ("regression" if getattr(datamodule, "task", "") == "regression"
                                             else "classification")
    transform = mc_output_transform(getattr(getattr(module, "hparams", {}), "get", lambda *_: None)("loss"))
    scaling = declared_scaling(datamodule) if task == "regression" and unc.units == "original" else None
    if scaling is not None:  # predictions in the targets' own units, as the MC metrics report them
        transform = original_units_transform(scaling, transform)
    callback = MCDropoutPredict(samples=samples or unc.samples, task=task, score=unc.score, strategy=unc.strategy,
                                budget_bytes=int(unc.budget_mb * 2**20), seed=unc.seed, tau=unc.tau,
                                output_transform=transform, batch=cfg.data.batch)
    if split == "predict" or (split == "val" and _has_own(datamodule, "predict_dataloader")):
        datamodule.setup("predict")
        loader, used = datamodule.predict_dataloader(), "predict"
    elif split == "train":
        loader, used = getattr(datamodule, "train_eval_dataloader", datamodule.train_dataloader)(), "train"
    else:
        datamodule.setup("validate")
        loader, used = datamodule.val_dataloader(), "val"
    refuse_nonfinite(loader, what=used, data=data_name, batch_format=callback.batch_format)
    try:
        with _lightning_quiet():
            trainer = pl.Trainer(accelerator=cfg.trainer.get("accelerator", "cpu"), devices=1, logger=False,
                                 enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
            with stopping.lightning_interrupts(trainer):
                predictions = trainer.predict(module, loader)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        if isinstance(exc, RegfwError):
            raise
        raise ConfigError(_mismatch(exc, checkpoint, data_name, used, loader, callback.batch_format),
                          key="data") from None
    rows = prediction_rows(predictions or [], callback.score, unc.threshold, unc.refer_fraction)  # type: ignore[arg-type]
    return write_table(rows, out, force=force), rows


@contextlib.contextmanager
def _lightning_quiet() -> Iterator[None]:
    """Lightning's info lines (the accelerators found, tips, "Detected KeyboardInterrupt") left out
    while ``regfw predict`` runs: its report, or its one error line, is the command's output."""
    import logging

    log = logging.getLogger("pytorch_lightning")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def _mismatch(exc: Exception, checkpoint: str, data: str, split: str, loader: Any, fmt: BatchFormat) -> str:
    """The one line for a model that fails on the data's inputs (a wrong width, a wrong dtype)."""
    shape = ""
    with contextlib.suppress(Exception):
        batch = next(iter(loader))
        inputs = batch if isinstance(batch, Tensor) else split_batch(batch, fmt)[0]
        shape = (f" (inputs of shape {list(inputs.shape[1:])} per row)" if isinstance(inputs, Tensor)
                 else f" (inputs: {describe_output(inputs)})")
    text = " ".join(str(exc).split())
    return (f"the model of checkpoint {checkpoint!r} cannot predict the {split} inputs of data {data!r}{shape}: "
            f"{type(exc).__name__}: {text[:200]}. Predict with the data the checkpoint was trained on (its run's "
            f"config.yaml).")


def _has_own(datamodule: Any, name: str) -> bool:
    method = getattr(type(getattr(datamodule, "inner", datamodule)), name, None)
    return method is not None and method is not getattr(pl.LightningDataModule, name, None)
