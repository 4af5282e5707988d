"""Build models and data modules from config sections: built-ins by name, others by class path."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from regfw.build import datasets as data
from regfw.build.models import BUILTIN_MODELS
from regfw.config.imports import import_class
from regfw.errors import ConfigError


def _instantiate(cls: type, init_args: Mapping[str, Any], key: str) -> Any:
    try:
        return cls(**dict(init_args))
    except TypeError as exc:
        raise ConfigError(f"{key}.init_args: {cls.__name__}({', '.join(map(str, init_args))}) failed: {exc}") from None


def build_datamodule(data_cfg: Any, seed: int = 0, *, lightning: bool = True) -> Any:
    """A LightningDataModule from ``data:``; with ``lightning=False`` a built-in dataset is the plain
    data class (the same data and shapes, without importing Lightning: for ``regfw plan``)."""

    if data_cfg.class_path:
        cls = import_class(data_cfg.class_path, "data.class_path")
        made = _instantiate(cls, data.data_module_args(cls, data_cfg.init_args, data_cfg), "data")
        if not lightning:
            return made
        from regfw.build.lightning_data import adapt_datamodule

        return adapt_datamodule(made)
    cls = (data.BUILTIN_DATA if lightning else data.BUILTIN_PLAIN_DATA)[data_cfg.name]
    return cls(batch_size=data_cfg.batch_size, val_fraction=data_cfg.val_fraction,
               train_fraction=data_cfg.train_fraction, seed=seed, num_workers=data_cfg.num_workers,
               **dict(data_cfg.init_args))


def build_model(model_config: Mapping[str, Any]) -> Any:
    """An ``nn.Module`` from ``{name|class_path, init_args}`` (:func:`regfw.build.parts.model_config_for`)."""

    if model_config.get("class_path"):
        cls = import_class(model_config["class_path"], "model.class_path")
    else:
        name = model_config.get("name")
        if name not in BUILTIN_MODELS:
            raise ConfigError(f"model.name: got {name!r}, expected one of {', '.join(BUILTIN_MODELS)}.")
        cls = BUILTIN_MODELS[name]
    return _instantiate(cls, model_config.get("init_args") or {}, "model")
