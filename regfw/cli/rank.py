"""The `regfw rank` command: active learning from a trained checkpoint and its config's data.

Command glue only (load the config, the data and the checkpoint, call the library; `regfw.cli.main`
prints); the acquisition functions and the ranking are in :mod:`regfw.uncertainty.acquisition`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from regfw.errors import ConfigError, RunError


def load_module(checkpoint: str) -> Any:
    """A :class:`~regfw.train.module.RegularizedModule` from a ``regfw fit`` checkpoint, in eval mode."""
    from regfw.train.module import RegularizedModule

    path = Path(checkpoint)
    if path.is_dir():
        hint = path / "checkpoints" / "last.ckpt" if (path / "checkpoints").is_dir() else path / "last.ckpt"
        raise RunError(f"checkpoint {str(path)!r} is a directory, not a checkpoint file; pass a .ckpt file in it, "
                       f"such as {str(hint)!r}")
    if not path.exists():
        raise RunError(f"checkpoint {str(path)!r} does not exist; pass a file from <run dir>/checkpoints/")
    if not path.is_file():
        raise RunError(f"checkpoint {str(path)!r} is not a regular file; pass a .ckpt file from "
                       f"<run dir>/checkpoints/")
    from regfw.run.checkpoints import read_checkpoint

    ckpt = read_checkpoint(path)  # a truncated, corrupt or foreign file is reported by name
    try:
        if (ckpt.get("regfw") or {}).get("callback"):  # a module of one's own, trained with regfw.Regularize
            from regfw.train.regularize import load_regularized

            return load_regularized(None, path)
        module = RegularizedModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    except RunError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported with the file name
        raise RunError(f"checkpoint {str(path)!r} could not be loaded: {type(exc).__name__}: {exc}") from None
    return module.eval()


@dataclass
class RankResult:
    """What ``regfw rank`` reports: the ranked inputs, and those referred for review instead (their
    model output held a NaN or an infinity, so they have no score to rank by)."""

    indices: Tensor
    scores: Tensor
    referred: list[int] = field(default_factory=list)


def check_samples(samples: int | None, flag: str = "--samples") -> None:
    """Refuse a number of MC samples (``regfw rank`` and ``regfw predict``) outside the bounds
    ``uncertainty.samples`` has, before any work (a billion would die in allocation much later)."""
    from regfw.config.schema import MAX_SAMPLES

    if samples is not None and not 2 <= samples <= MAX_SAMPLES:
        raise ConfigError(f"{flag}: got {samples}, expected at least 2 and at most {MAX_SAMPLES} Monte Carlo samples "
                          f"per input (30 is typical).", key="uncertainty.samples")


def check_k(k: int) -> None:
    """``--k`` is a whole number of inputs, at least 1."""
    if k < 1:
        raise ConfigError(f"--k: got {k}, expected at least 1 (how many inputs to list for labelling).")


def rank_checkpoint(config: str, checkpoint: str, overrides: Sequence[str] = (), *, k: int = 50,
                    acquisition: str = "bald", split: str = "val", samples: int = 30) -> RankResult:
    """The ``k`` samples of the config's ``split`` most worth labelling, by ``acquisition``.

    Inputs with NaN or infinite values are refused by row before the model runs
    (:mod:`regfw.cli.finite_inputs`); inputs whose model output is not finite are not ranked but
    returned as ``referred``. The inputs of each batch are found by the config's ``data.batch``
    (:func:`regfw.train.batch.split_batch`: a dict batch gives the model its keyword inputs).
    """
    from regfw.build.factory import build_datamodule
    from regfw.cli.finite_inputs import refuse_nonfinite
    from regfw.config.schema import load_config
    from regfw.run.checkpoints import read_checkpoint
    from regfw.train.batch import BatchFormat, split_batch
    from regfw.uncertainty.acquisition import acquisition_scores
    from regfw.uncertainty.heldout import prepare_heldout

    check_k(k)
    check_samples(samples)
    cfg = load_config(config, overrides)
    datamodule = build_datamodule(cfg.data, seed=cfg.seed)
    prepare_heldout(datamodule, cfg.uncertainty, cfg.seed)  # the same splits as the fit
    module = load_module(checkpoint)
    temperature = (read_checkpoint(Path(checkpoint)).get("regfw_calibration") or {}).get("temperature")
    if split == "train":
        loader = getattr(datamodule, "train_eval_dataloader", None)
        if loader is None:
            raise RunError("--split train needs a data module with train_eval_dataloader(); use --split val")
        loader = loader()
    else:
        datamodule.setup("validate")
        loader = datamodule.val_dataloader()
    batch_format = BatchFormat.coerce(cfg.data.batch, "data.batch")
    refuse_nonfinite(loader, what=split, data=str(cfg.data.name or cfg.data.class_path), batch_format=batch_format)
    try:
        scores = acquisition_scores(module, loader, acquisition=acquisition, samples=samples,
                                    seed=cfg.uncertainty.seed, temperature=temperature,
                                    batch_to_input=lambda batch: split_batch(batch, batch_format)[0])
    except ValueError as exc:
        raise RunError(str(exc)) from None
    finite = torch.isfinite(scores)
    usable = torch.nonzero(finite).flatten()
    order = usable[torch.sort(scores[usable], descending=True, stable=True).indices[:k]]
    return RankResult(order, scores[order], torch.nonzero(~finite).flatten().tolist())
