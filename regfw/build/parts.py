"""What a plan needs, built once from a validated config, without Lightning.

:func:`build_parts` turns a :class:`~regfw.config.schema.Config` and its data into the model, the
loss, the regularizer objects and the applied plan. ``regfw plan`` stops there
(:func:`build_plan`, about a second: no Lightning); :func:`regfw.build.fit.build_fit` adds the
Lightning data module, the ``RegularizedModule`` and the callbacks around the same parts, so a
plan shown and a plan trained are made by one function.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from regfw.build.datasets import describe_data
from regfw.build.factory import build_datamodule, build_model, import_class
from regfw.config.schema import Config
from regfw.errors import ConfigError, RegfwError
from regfw.extend.regularizer import Regularizer
from regfw.model_io import example_from_spec, example_spec
from regfw.placement.plan import Plan, apply_plan, make_plan
from regfw.registry.blame import plugin_error
from regfw.registry.regularizers import build_regularizers
from regfw.train.losses import check_loss_fits_data, check_model_loss, outputs_per_target, resolve_loss


@dataclass
class Parts:
    """The model with its plan applied, and what it was made from; built by :func:`build_parts`."""

    model: torch.nn.Module
    #: ``{name|class_path, init_args}``: what rebuilds the model (kept in the checkpoint).
    model_config: dict
    #: ``model.loss`` with ``auto`` decided by the data.
    loss: Any
    regularizers: list[Regularizer]
    plan: Plan
    #: The training-set size (the rate policy's N), or None when the data cannot tell.
    n_train: int | None
    #: One input batch of the data (only its shapes and dtypes are used), or None.
    example: Any
    #: What was assumed about the data (shown by ``regfw plan``).
    notes: list[str] = field(default_factory=list)


def build_data(cfg: Config, **options: Any) -> Any:
    """The data module of ``cfg.data``; anything that goes wrong is a :class:`ConfigError` naming
    ``data`` (a wrong ``init_args`` key, a ``class_path`` that is not a LightningDataModule)."""
    what = cfg.data.class_path or cfg.data.name
    if cfg.data.class_path:
        target = import_class(cfg.data.class_path, "data.class_path")
        if not (isinstance(target, type) and hasattr(target, "train_dataloader")):
            raise ConfigError(f"data.class_path: {cfg.data.class_path!r} is {_kind_of(target)}, not a "
                              f"LightningDataModule class (one with train_dataloader()).", key="data.class_path")
    try:
        return build_datamodule(cfg.data, seed=cfg.seed, **options)
    except RegfwError:
        raise
    except Exception as exc:  # noqa: BLE001 - a user's data module may fail in any way
        raise ConfigError(f"data: building {what!r} with init_args {dict(cfg.data.init_args)} failed: "
                          f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}. Check data.init_args against "
                          f"its __init__ arguments.", key="data.init_args") from None


def model_config_for(cfg: Config, data: Any | None) -> dict:
    """The serialisable ``{name|class_path, init_args}`` that rebuilds the model.

    Built-in models get ``in_features`` and ``num_outputs`` from the data unless set (two outputs
    per target for a loss that predicts a variance too).
    """
    model_cfg = cfg.model
    if model_cfg.class_path:
        return {"class_path": model_cfg.class_path, "init_args": dict(model_cfg.init_args)}
    args = dict(model_cfg.init_args)
    if data is not None:
        args.setdefault("in_features", getattr(data, "input_dim", 64))
        args.setdefault("num_outputs", getattr(data, "num_outputs", 10) * outputs_per_target(model_cfg.loss))
    return {"name": model_cfg.name, "init_args": args}


def build_parts(cfg: Config, data: Any, *, trainable: bool = False) -> Parts:
    """The model of ``cfg`` with its regularizers' plan applied, planned on a zero batch shaped like
    the data's example input. ``trainable``: the model must train with ``loss(model(x), y)`` (not a
    detection model computing its own losses), checked before planning. Every failure is a
    :class:`RegfwError` naming what to fix (the plugin whose code raised, or the model not fitting
    the data)."""
    _check_model_target(cfg, data)
    n_train, example, notes = describe_data(data, cfg.data.batch)
    model_config = model_config_for(cfg, data)
    with building(model_config, example):
        loss = resolve_loss(cfg.model.loss, getattr(data, "task", None))
        model = build_model(model_config)
        if trainable:
            check_model_loss(model)
        with warnings.catch_warnings():  # the same checks warned when the config was validated
            warnings.simplefilter("ignore")
            regularizers = build_regularizers(dict(cfg.regularizers or {}), config=cfg)
        zeros = None if example is None else example_from_spec(*example_spec(example))
        plan = make_plan(model, regularizers, n_train, zeros)
        apply_plan(model, regularizers, plan)
    if notes:
        plan.notes["data"] = notes
    return Parts(model, model_config, loss, regularizers, plan, n_train, example, notes)


def build_plan(cfg: Config) -> Plan:
    """The plan a fit of ``cfg`` would apply, without Lightning (``regfw plan``): the same
    :func:`build_parts`, on the plain data classes."""
    return build_parts(cfg, build_data(cfg, lightning=False)).plan


def _kind_of(obj: Any) -> str:
    if isinstance(obj, type):
        return f"the class {obj.__module__}.{obj.__qualname__}"
    if callable(obj):
        return f"the function {getattr(obj, '__qualname__', obj)!s}"
    return f"{type(obj).__name__} {obj!r}"[:80]


def _check_model_target(cfg: Config, data: Any) -> None:
    """``model.class_path`` names an ``nn.Module`` class or factory; the loss fits the data's task."""
    if cfg.model.class_path:
        target = import_class(cfg.model.class_path, "model.class_path")
        if not callable(target) or (isinstance(target, type) and not issubclass(target, torch.nn.Module)):
            raise ConfigError(f"model.class_path: {cfg.model.class_path!r} is {_kind_of(target)}, not a "
                              f"torch.nn.Module class.", key="model.class_path")
    check_loss_fits_data(cfg.model.loss, getattr(data, "task", None), str(cfg.data.name or cfg.data.class_path))


@contextlib.contextmanager
def building(model_config: Mapping[str, Any], example: Any) -> Iterator[None]:
    """Building the model and its plan: an exception that is not a :class:`RegfwError` is reported as
    :func:`_building_error` names it (the plugin that raised, or the model not fitting the data)."""
    try:
        yield
    except RegfwError:
        raise
    except Exception as exc:  # noqa: BLE001 - a plugin's code may raise anything; it is named, not the model
        error = _building_error(exc, model_config, example)
        if error is exc:
            raise
        raise error from exc


def _building_error(exc: Exception, model_config: Mapping[str, Any], example: Any) -> Exception:
    """What building the model and its plan failing is reported as: the plugin whose code raised
    (:mod:`regfw.registry.blame`), else the model not fitting the data, else ``exc`` itself."""
    blamed = plugin_error(exc, "while building the model and its plan")
    if blamed is not None:
        return blamed
    if isinstance(exc, (RuntimeError, ValueError, TypeError, AttributeError, IndexError, KeyError)):
        return _model_error(exc, model_config, example)
    return exc


def _model_error(exc: Exception, model_config: Mapping[str, Any], example: Any) -> ConfigError:
    """Most often the model does not fit the data: its forward pass on one batch is what fails."""
    name = model_config.get("name") or model_config.get("class_path")
    shape = getattr(example, "shape", None)
    batch = (f" on the data's example batch (shape {list(shape)}, {str(example.dtype).replace('torch.', '')})"
             if shape is not None else "")
    return ConfigError(f"model: building {name!r} with init_args {model_config.get('init_args') or {}}{batch} "
                       f"failed: {type(exc).__name__}: {exc}. If the shapes disagree, set model.init_args "
                       f"(e.g. in_features, num_outputs) to match the data.")
