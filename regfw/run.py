"""Running a config: the run directory, the Trainer, and the final evaluation."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from regfw.config import Config
from regfw.errors import RunError


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never half-written."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def new_run_dir(cfg: Config, explicit: Optional[str] = None) -> Path:
    """A fresh run directory; an existing one is never reused silently.

    With ``explicit`` the directory must not exist yet (or must be empty). Otherwise it is
    ``<run.dir>/<run.name or config stem>-<timestamp>``, with ``-2``, ``-3`` ... appended when
    that name is taken (created with ``mkdir``, which fails rather than reuse).
    """
    if explicit:
        path = Path(explicit)
        if path.exists() and any(path.iterdir()):
            raise RunError(f"run directory {str(path)!r} exists and is not empty; choose a new one "
                           f"or resume it with `regfw fit CONFIG --resume`")
        path.mkdir(parents=True, exist_ok=True)
        return path
    root = Path(cfg.run.dir)
    root.mkdir(parents=True, exist_ok=True)
    stem = cfg.run.name or (Path(cfg.source).stem if cfg.source else "run")
    base = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in range(1, 1000):
        path = root / (base if n == 1 else f"{base}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RunError(f"could not create a new run directory under {str(root)!r}")


@dataclass
class FitResult:
    """What a fit produced: where, and the final metrics."""

    run_dir: Path
    config_path: Path
    checkpoint: Optional[Path]
    metrics: dict[str, float] = field(default_factory=dict)
    plots: dict[str, str] = field(default_factory=dict)
    module: Any = None


@torch.no_grad()
def evaluate(module: Any, dataloader: Any) -> dict[str, float]:
    """Loss (and accuracy for classification) of ``module`` in eval mode over ``dataloader``."""
    was_training = module.training
    module.eval()
    total, loss_sum, correct = 0, 0.0, 0
    try:
        for x, y in dataloader:
            out = module(x)
            loss_sum += float(module.loss_fn(out, y)) * len(x)
            if module.task == "classification":
                correct += int((out.argmax(-1) == y).sum())
            total += len(x)
    finally:
        module.train(was_training)
    result = {"loss": loss_sum / max(total, 1)}
    if module.task == "classification":
        result["acc"] = correct / max(total, 1)
    return result


def build_module(cfg: Config, datamodule: Any) -> Any:
    """The :class:`~regfw.module.RegularizedModule` for ``cfg`` and its data."""
    from regfw.factory import model_config_for, resolve_loss
    from regfw.module import RegularizedModule

    example = datamodule.example_input() if hasattr(datamodule, "example_input") else None
    return RegularizedModule(
        model=None,
        loss=resolve_loss(cfg.model, datamodule),
        regularizers=cfg.regularizers,
        optimizer={k: v for k, v in vars(cfg.optimizer).items()},
        n_examples=getattr(datamodule, "n_train", None),
        example_input=example,
        model_config=model_config_for(cfg.model, datamodule),
    )


def uncertainty_callback(cfg: Config, module: Any, plot_dir: Path) -> Optional[Any]:
    """The MC dropout callback for ``cfg.uncertainty``, or None when it is off.

    It is off when ``uncertainty.enabled`` is false or the model has no stochastic module (for
    example a run without a dropout regularizer); it is never an error to leave it on.
    """
    from regfw.uncertainty import MCDropoutUncertainty, stochastic_modules

    unc = cfg.uncertainty
    if not unc.enabled or not stochastic_modules(module):
        return None
    return MCDropoutUncertainty(
        samples=unc.samples, strategy=unc.strategy, budget_bytes=int(unc.budget_mb * 2**20), task=module.task,
        every_n_epochs=unc.every_n_epochs, max_batches=unc.max_batches, score=unc.score,
        threshold=unc.threshold, refer_fraction=unc.refer_fraction, plots=unc.plots,
        plot_dir=str(plot_dir), seed=unc.seed,
    )


def fit(cfg: Config, *, run_dir: Optional[str] = None, callbacks: Sequence[Any] = (),
        quiet: bool = False) -> FitResult:
    """Train ``cfg`` in a new run directory and evaluate the result."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    from regfw.factory import build_datamodule

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg.data, seed=cfg.seed)
    module = build_module(cfg, datamodule)
    path = new_run_dir(cfg, run_dir)
    config_path = path / "config.yaml"
    write_atomic(config_path, cfg.to_yaml())
    write_atomic(path / "plan.txt", module.plan.format() + "\n")
    ckpt_cb = ModelCheckpoint(dirpath=path / "checkpoints", filename="epoch={epoch:03d}", save_last=True,
                              auto_insert_metric_name=False)
    trainer_args = dict(cfg.trainer)
    if quiet:
        trainer_args.update(enable_progress_bar=False, enable_model_summary=False)
    mc = uncertainty_callback(cfg, module, path / "plots")
    trainer = pl.Trainer(
        **trainer_args,
        default_root_dir=str(path),
        logger=CSVLogger(save_dir=str(path), name="", version=""),
        callbacks=[ckpt_cb, *([mc] if mc else []), *callbacks],
    )
    trainer.fit(module, datamodule=datamodule)
    last = Path(ckpt_cb.last_model_path) if ckpt_cb.last_model_path else None
    metrics = {}
    train_loader = getattr(datamodule, "train_eval_dataloader", datamodule.train_dataloader)()
    for split, loader in (("train", train_loader), ("val", datamodule.val_dataloader())):
        for name, value in evaluate(module, loader).items():
            metrics[f"{split}_{name}"] = value
    plots: dict[str, str] = {}
    if mc is not None:
        metrics.update({f"mc_{k.replace('mc/', '')}": v for k, v in mc.last_metrics.items()})
        plots = dict(mc.last_plots)
    return FitResult(path, config_path, last, metrics, plots=plots, module=module)
