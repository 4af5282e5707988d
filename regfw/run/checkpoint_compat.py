"""Does a checkpoint belong to the module built from the config? Every difference, by config key.

:func:`check_compatible` compares the hyperparameters (model, loss, regularizers and their
settings, optimizer, data size), the regularizers' plugins, the model class, and the parameter
names and shapes; :func:`missing_plugins` names the regularizers no installed plugin provides.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from regfw.errors import RegfwError, RunError, short_repr
from regfw.registry.regularizers import get_registry

__all__ = ["ABSENT", "check_compatible", "hparam_differences", "missing_plugins", "state_differences"]

PathLike = str | Path


#: How hyperparameters are called in the config, for messages.
_CONFIG_KEYS = {
    "model_config": "model",
    "loss": "model.loss",
    "regularizers": "regularizers",
    "optimizer": "optimizer",
    "n_examples": "data (number of training examples)",
    "input_shape": "data (input shape)",
    "input_dtype": "data (input dtype)",
}
#: Hyperparameters from the ``run`` section, which may change on resume (``run.on_nan``).
_MAY_CHANGE_ON_RESUME = frozenset({"on_nan"})


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


#: Stands for a key that one side does not have.
ABSENT: Any = _Absent()


def _diff(found: Any, expected: Any, key: str, out: list[tuple[str, Any, Any]]) -> None:
    if isinstance(found, Mapping) and isinstance(expected, Mapping):
        for name in list(found) + [k for k in expected if k not in found]:
            _diff(found.get(name, ABSENT), expected.get(name, ABSENT), f"{key}.{name}", out)
        return
    if isinstance(found, (list, tuple)) and isinstance(expected, (list, tuple)):
        found, expected = list(found), list(expected)
    if found != expected:
        out.append((key, found, expected))


def hparam_differences(found: Mapping[str, Any], expected: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(config key, checkpoint value, config value)`` for every hyperparameter that differs."""
    out: list[tuple[str, Any, Any]] = []
    for name in sorted((set(found) | set(expected)) - _MAY_CHANGE_ON_RESUME):
        key = _CONFIG_KEYS.get(name, name)
        if name == "model_config":
            # {"name": "mlp", "init_args": {...}} reads as model.name, model.init_args.*
            f, e = found.get(name) or {}, expected.get(name) or {}
            for sub in sorted(set(f) | set(e)):
                _diff(f.get(sub, ABSENT), e.get(sub, ABSENT), f"model.{sub}", out)
            continue
        _diff(found.get(name, ABSENT), expected.get(name, ABSENT), key, out)
    return out


def state_differences(found: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> list[str]:
    """Parameter and buffer names missing, unexpected, or of another shape, as readable lines."""
    lines = []
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    shapes = [k for k in expected if k in found and tuple(found[k].shape) != tuple(expected[k].shape)]
    if missing:
        lines.append(f"missing from the checkpoint: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if extra:
        lines.append(f"not in the model: {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
    for k in shapes[:5]:
        lines.append(f"{k} has shape {tuple(found[k].shape)} in the checkpoint, "
                     f"{tuple(expected[k].shape)} in the model")
    return lines


def check_compatible(ckpt: Mapping[str, Any], module: Any, path: PathLike, config: str | None = None) -> None:
    """Raise a :class:`RunError` unless ``ckpt`` was written by a module built like ``module``.

    Compares the hyperparameters the module was built from (so a changed rate, model size,
    regularizer set or optimizer setting is caught even where the weights' shapes agree; a
    changed optimizer would otherwise be silently replaced by the checkpoint's optimizer state),
    the regularizers and model class in the ``regfw`` metadata, and the parameter names and
    shapes. The ``trainer``, ``run`` and ``uncertainty`` sections may change on resume.
    """
    where = f"config {config!r}" if config else "the config"
    problems = []
    registry = get_registry()
    expected = dict(module.hparams)
    found = _as_config_names(ckpt.get("hyper_parameters") or {}, expected, registry)
    for key, f, e in hparam_differences(found, expected):
        if f is ABSENT:
            problems.append(f"{key} is not in the checkpoint but is {short_repr(e)} in {where}")
        elif e is ABSENT:
            problems.append(f"{key} is {short_repr(f)} in the checkpoint but not in {where}")
        else:
            problems.append(f"{key} is {short_repr(f)} in the checkpoint but {short_repr(e)} in {where}")
    gone = missing_plugins(ckpt, registry)
    if gone:
        problems.insert(0, f"the checkpoint's {', '.join(gone)} is provided by no installed plugin")
    meta = ckpt.get("regfw") or {}
    model_class = f"{type(module.model).__module__}.{type(module.model).__qualname__}"
    if meta.get("model_class") and meta["model_class"] != model_class:
        problems.append(f"the model class is {meta['model_class']} in the checkpoint but {model_class} in {where}")
    if not problems:
        problems = state_differences(ckpt.get("state_dict") or {}, module.state_dict())
    if problems:
        listed = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise RunError(f"checkpoint {str(path)!r} does not match {where}: {listed}. Resume with the settings the "
                       f"run was started with (its config.yaml), or start a new run without --resume.")


def _as_config_names(found: Mapping[str, Any], expected: Mapping[str, Any], registry: Any) -> dict[str, Any]:
    """The checkpoint's hyperparameters ``found`` with each regularizer key renamed to the config's key that
    selects the same plugin, so ``dropout``, ``regfw:dropout`` and a distribution's other spellings compare
    equal and differences are named as the config writes them; other keys stay as written."""
    regs, mine = found.get("regularizers"), expected.get("regularizers")
    if not isinstance(regs, Mapping) or not isinstance(mine, Mapping):
        return dict(found)

    def provider(name: str) -> str:
        try:
            return str(registry.get(name).qualified_name)
        except RegfwError:  # unknown or ambiguous here: compared (and reported) as written
            return name

    spelled = {provider(name): name for name in mine}
    return {**found, "regularizers": {spelled.get(provider(name), name): v for name, v in regs.items()}}


def missing_plugins(ckpt: Mapping[str, Any], known: Any) -> list[str]:
    """Lines naming each regularizer of ``ckpt`` that no installed plugin provides, with its origin."""
    meta = ckpt.get("regfw") or {}
    origins = meta.get("plugins") or {}
    found = (ckpt.get("hyper_parameters") or {}).get("regularizers") or meta.get("regularizers") or []
    names = [found] if isinstance(found, str) else list(found) if isinstance(found, (Mapping, list, tuple)) else []
    lines = []
    for name in names:
        if name in known:
            continue
        origin = origins.get(name) or {}
        dist = origin.get("distribution")
        where = f"plugin {origin.get('plugin')!r}" if origin.get("plugin") else "a plugin"
        if dist:
            where += f" of distribution {dist} {origin.get('version') or ''}".rstrip()
        lines.append(f"regularizer {name!r} (from {where})")
    return lines
