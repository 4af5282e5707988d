"""Build once: everything a fit needs, from a validated config.

:func:`build_fit` is the one place a ``Config`` becomes runtime objects: the Lightning data module
(resumable, with its calibration split and OOD set carved out), the model with its plan applied, the
loss, the regularizer objects (:func:`regfw.build.parts.build_parts`, the same function ``regfw plan``
uses), the :class:`~regfw.train.module.RegularizedModule` that takes them as they are, and the
callbacks. The config itself stays plain data; :func:`regfw.run.job.fit` only runs what was built.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

import pytorch_lightning as pl

from regfw.build.parts import Parts, build_data, build_parts, building
from regfw.config.schema import Config
from regfw.run.distributed import make_resumable
from regfw.train.losses import mc_output_transform
from regfw.train.module import RegularizedModule
from regfw.train.optim import optimizer_spec
from regfw.uncertainty.callback import MCDropoutUncertainty
from regfw.uncertainty.heldout import Heldout, prepare_heldout
from regfw.uncertainty.modes import stochastic_modules


@dataclass
class FitParts:
    """What one fit of a config runs: built by :func:`build_fit`, before anything is written."""

    datamodule: Any
    #: The calibration split and OOD set the MC callback evaluates on.
    heldout: Heldout
    #: The model, plan and regularizers of :func:`~regfw.build.parts.build_parts`.
    parts: Parts
    module: RegularizedModule
    #: The MC dropout callback when ``uncertainty`` is on and the model has a stochastic layer, else None.
    uncertainty: MCDropoutUncertainty | None

    @property
    def callbacks(self) -> list[pl.Callback]:
        """The callbacks a ``Trainer`` of this fit takes (the MC dropout callback when it is on)."""
        return [self.uncertainty] if self.uncertainty is not None else []


def build_fit(cfg: Config) -> FitParts:
    """Seed, then build the data, model, loss, regularizers, plan, module and callbacks of ``cfg``.

    Every failure is a :class:`~regfw.errors.RegfwError` naming what to fix; nothing is written.
    The MC callback draws its figures into ``<trainer.log_dir>/plots`` unless its ``plot_dir`` is set
    (``regfw fit`` sets it to the run directory's ``plots/`` once the directory is claimed).
    """
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = make_resumable(build_data(cfg), cfg.seed)
    heldout = prepare_heldout(datamodule, cfg.uncertainty, cfg.seed)
    parts = build_parts(cfg, datamodule, trainable=True)
    with building(parts.model_config, parts.example):
        module = RegularizedModule(
            model=parts.model,
            loss=parts.loss,
            regularizers=parts.regularizers,
            plan=parts.plan,
            optimizer=optimizer_spec(cfg.optimizer),
            lr_scheduler=asdict(cfg.lr_scheduler) if cfg.lr_scheduler else None,
            batch=cfg.data.batch,
            n_examples=parts.n_train,
            example_input=parts.example,
            model_config=parts.model_config,
            on_nan=cfg.run.on_nan,
            output_key=cfg.model.output_key,
        )
    mc = uncertainty_callback(cfg, module, heldout=heldout)
    return FitParts(datamodule, heldout, parts, module, mc)


def uncertainty_callback(cfg: Config, module: Any, plot_dir: Any = None,
                         heldout: Heldout | None = None) -> MCDropoutUncertainty | None:
    """The MC dropout callback for ``cfg.uncertainty``, or None when it is off.

    It is off when ``uncertainty.enabled`` is false or the model has no stochastic module (for
    example a run without a dropout regularizer); it is never an error to leave it on.
    """
    unc = cfg.uncertainty
    if not unc.enabled:
        return None
    if not stochastic_modules(module):
        warnings.warn("regfw: uncertainty.enabled is true, but the model has no active dropout (no dropout "
                      "regularizer, or all its rates are 0): MC dropout uncertainty is off for this run. Select a "
                      "dropout regularizer, or set uncertainty.enabled: false.", stacklevel=2)
        return None
    return MCDropoutUncertainty.from_config(
        unc, task=module.task, plot_dir=None if plot_dir is None else str(plot_dir),
        output_transform=mc_output_transform(module.hparams.loss),
        calibrate=heldout is not None and heldout.calibration is not None,
        calibration_loader=heldout.calibration if heldout is not None else None,
        ood_loader=heldout.ood if heldout is not None else None,
    )
