"""Config field helpers and the validation of a config section against its dataclass.

The base of :mod:`regfw.config.schema` (the whole config file) and :mod:`regfw.registry.regularizers` (each
regularizer's section against its plugin's ``Config``), kept apart so that neither needs the
other. Plugins import these names from :mod:`regfw.config.schema`, their public home.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import field
from typing import Any, Literal, Union

from omegaconf import DictConfig, ListConfig, OmegaConf

from regfw.errors import ConfigError, closest_hint

#: ``Optional[float]`` and ``float | None`` (PEP 604) have different origins.
_UNIONS = (Union, types.UnionType)

# -- field helpers ------------------------------------------------------------------------------


def rate(default: float | None = None, *, doc: str = "") -> Any:
    """A dropout-style rate in [0, 1)."""
    return field(default=default, metadata={"range": (0.0, 1.0, "[0, 1)"), "doc": doc})


def nonneg(default: Any = 0.0, *, doc: str = "") -> Any:
    """A number >= 0."""
    return field(default=default, metadata={"range": (0.0, None, ">= 0"), "doc": doc})


def positive(default: Any, *, doc: str = "") -> Any:
    """A number > 0."""
    return field(default=default, metadata={"range": (0.0, None, "> 0", "exclusive"), "doc": doc})


# -- validation --------------------------------------------------------------------------------


def _to_plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in _UNIONS:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against type ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in _UNIONS:
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: got {value!r}, expected a finite number.")
        real = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is not None and len(real) == 1:  # Optional[X]: X's own message, which says what is wrong
            try:
                return _coerce(value, real[0], key)
            except ConfigError as exc:
                text = str(exc)
                if text.startswith(f"{key}: ") and text.endswith("."):
                    text = text[:-1] + ", or null."  # the key itself may be null, not an element of it
                raise ConfigError(text, key=key) from None
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: got {value!r}, expected {_type_name(tp)}.")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise ConfigError(
            f"{key}: got {value!r}, expected one of {', '.join(repr(c) for c in choices)}."
            f"{closest_hint(str(value), [str(c) for c in choices])}"
        )
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: got {value!r}, expected null.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: got {value!r}, expected true or false.")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key}: got {value!r}, expected a finite number.")
            return float(value)
        raise ConfigError(f"{key}: got {value!r} ({type(value).__name__}), expected a number.")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: got {value!r} ({type(value).__name__}), expected a whole number.")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: got {value!r} ({type(value).__name__}), expected a string.")
    if origin in (list, Sequence, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: got {value!r}, expected a list.")
        args = typing.get_args(tp)
        if args:
            return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        return list(value)
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: got {value!r}, expected a mapping.")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return validate_dataclass(typing.cast(type, tp), value, key)
    return value


def _check_range(value: Any, meta: Mapping, key: str) -> None:
    spec = meta.get("range")
    if spec is None or value is None or not isinstance(value, (int, float)):
        return
    low, high, text = spec[0], spec[1], spec[2]
    exclusive_low = len(spec) > 3
    bad = (value <= low if exclusive_low else value < low) or (high is not None and value >= high)
    if bad:
        raise ConfigError(f"{key}: got {value!r}, expected a value in {text}. "
                          f"Change it or remove it to use the default.")


def validate_dataclass(cls: type, data: Any, key: str) -> Any:
    """An instance of dataclass ``cls`` from ``data``, or a :class:`ConfigError` naming ``key``."""
    data = _to_plain(data)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{key}: got {data!r}, expected a mapping of settings (or nothing for the defaults).")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        if name not in fields:
            known = sorted(fields)
            raise ConfigError(
                f"{key}.{name}: unknown key. Known keys of {key}: {', '.join(known) or '(none)'}."
                f"{closest_hint(str(name), known)}"
            )
        checked = _coerce(value, hints[name], f"{key}.{name}")
        _check_range(checked, fields[name].metadata, f"{key}.{name}")
        kwargs[name] = checked
    try:
        instance = cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        # A dataclass's own check that names its field ("kinds: got ...") reports the dotted key.
        text = str(exc)
        field_name = text.split(":", 1)[0]
        if field_name in fields and text.startswith(field_name + ": "):
            raise ConfigError(f"{key}.{text}") from None
        raise ConfigError(f"{key}: {text}") from None
    for f in dataclasses.fields(cls):
        if f.name not in kwargs:
            _check_range(getattr(instance, f.name), f.metadata, f"{key}.{f.name}")
    return instance


def check_finite(obj: Any, names: Iterable[str]) -> None:
    """Reject NaN and infinity in the fields ``names`` of ``obj`` (YAML's ``.nan`` and ``.inf``
    pass range checks); call it from a config dataclass's ``__post_init__``. The ``ValueError``
    becomes a :class:`~regfw.errors.ConfigError` naming the section in :func:`validate_dataclass`."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{name}: got {value!r}, expected a finite number")
