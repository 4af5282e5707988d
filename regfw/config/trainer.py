"""The ``trainer:`` section, validated by value as well as by key.

Lightning checks few of its arguments' values (``max_epochs: 0`` trains nothing, ``-1`` and
``null`` train without end, ``true`` is one epoch, ``enable_progress_bar: 'false'`` turns the
bar on) and reports the rest with an ``AssertionError`` without a message. Every argument whose
values are known is checked here, each error naming ``trainer.KEY``, the value and what to write;
arguments regfw sets itself are refused with the reason, or supported by name (``logger``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from regfw.errors import ConfigError, closest_hint

#: Arguments regfw sets for every run, and why they cannot come from the config.
OWNED = {
    "callbacks": "regfw passes its own callbacks (checkpoints, seeding, MC dropout); a regularizer plugin adds "
                 "callbacks through its callbacks() method, and Python code through regfw.run.job.fit(callbacks=...)",
    "default_root_dir": "the run directory is the root; set run.dir (or pass --run-dir) instead",
    "enable_checkpointing": "regfw always writes checkpoints/last.ckpt, which --resume needs; "
                            "set run.checkpoint_every_n_steps to write it more often",
}
#: Loggers by name (``trainer.logger: csv``); true means the default, csv.
LOGGERS = ("csv", "tensorboard")
PRECISIONS = (16, 32, 64, "16", "32", "64", "bf16", "16-mixed", "bf16-mixed", "32-true", "64-true", "16-true",
              "bf16-true", "transformer-engine", "transformer-engine-float16")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu", "hpu")


def show(value: Any) -> str:
    """``value`` as YAML writes it: null, true, 'text', 3."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _fail(key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"trainer.{key}: got {show(value)}, expected {expected}.", key=f"trainer.{key}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bool(key: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise _fail(key, v, "true or false (without quotes)")


def _int_at_least(low: int, *, null: bool = False, extra: tuple = ()) -> Callable[[str, Any], None]:
    def check(key: str, v: Any) -> None:
        if (v is None and null) or v in extra and _is_int(v):
            return
        if not _is_int(v) or v < low:
            allowed = [f"a whole number >= {low}", *(str(e) for e in extra), *(["null"] if null else [])]
            raise _fail(key, v, " or ".join(allowed))
    return check


def _batches(zero_ok: bool) -> Callable[[str, Any], None]:
    """``limit_*_batches``, ``val_check_interval``: a count >= 1 or a fraction in (0, 1]."""
    def check(key: str, v: Any) -> None:
        if v is None:
            return
        if _is_int(v) and (v >= 1 or (zero_ok and v == 0)):
            return
        if isinstance(v, float) and math.isfinite(v) and (0.0 < v <= 1.0 or (zero_ok and v == 0.0)):
            return
        low = "0 (none)" if zero_ok else "1"
        note = "" if zero_ok else " (0 would train nothing)" if key == "limit_train_batches" else " (0 is no interval)"
        raise _fail(key, v, f"a number of batches >= {low} or a fraction in (0, 1], e.g. 0.5{note}")
    return check


def _clip(key: str, v: Any) -> None:
    if v is not None and (not _is_num(v) or v < 0):
        raise _fail(key, v, "a number >= 0 (0 or null: no clipping)")


def _choice(choices: tuple, *, null: bool = True) -> Callable[[str, Any], None]:
    def check(key: str, v: Any) -> None:
        if (v is None and null) or v in choices and not isinstance(v, bool):
            return
        raise ConfigError(f"trainer.{key}: got {show(v)}, expected one of {', '.join(repr(c) for c in choices)}."
                          f"{closest_hint(str(v), [str(c) for c in choices])}", key=f"trainer.{key}")
    return check


def _devices(key: str, v: Any) -> None:
    if v == "auto" or (_is_int(v) and (v >= 1 or v == -1)):
        return
    if isinstance(v, str) and v.replace(",", "").strip().isdigit():
        return
    if isinstance(v, list) and v and all(_is_int(d) and d >= 0 for d in v):
        return
    raise _fail(key, v, "a number of devices >= 1, -1 (all), 'auto', or a list of device indices")


def _deterministic(key: str, v: Any) -> None:
    if v is not None and not isinstance(v, bool) and v != "warn":
        raise _fail(key, v, "true, false or 'warn'")


def _fast_dev_run(key: str, v: Any) -> None:
    if not isinstance(v, bool) and not (_is_int(v) and v >= 0):
        raise _fail(key, v, "true, false or a number of batches >= 0")


def _overfit(key: str, v: Any) -> None:
    if (_is_int(v) and v >= 0) or (isinstance(v, float) and 0.0 <= v < 1.0):
        return
    raise _fail(key, v, "a number of batches >= 0 or a fraction in [0, 1)")


def _logger(key: str, v: Any) -> None:
    if isinstance(v, bool) or v is None or v in LOGGERS:
        return
    raise ConfigError(f"trainer.logger: got {v!r}, expected true, false or a logger by name: "
                      f"{', '.join(LOGGERS)}.{closest_hint(str(v), LOGGERS)}", key="trainer.logger")


def _string(key: str, v: Any) -> None:
    if v is not None and not isinstance(v, str):
        raise _fail(key, v, "a name (a string)")


CHECKS: dict[str, Callable[[str, Any], None]] = {
    "max_steps": _int_at_least(1, extra=(-1,)),
    "min_epochs": _int_at_least(0, null=True),
    "min_steps": _int_at_least(0, null=True),
    "limit_train_batches": _batches(zero_ok=False),
    "limit_val_batches": _batches(zero_ok=True),
    "limit_test_batches": _batches(zero_ok=True),
    "limit_predict_batches": _batches(zero_ok=True),
    "val_check_interval": _batches(zero_ok=False),
    "check_val_every_n_epoch": _int_at_least(1, null=True),
    "num_sanity_val_steps": _int_at_least(0, null=True, extra=(-1,)),
    "log_every_n_steps": _int_at_least(1, null=True),
    "accumulate_grad_batches": _int_at_least(1),
    "num_nodes": _int_at_least(1),
    "reload_dataloaders_every_n_epochs": _int_at_least(0),
    "gradient_clip_val": _clip,
    "gradient_clip_algorithm": _choice(("norm", "value")),
    "precision": _choice(PRECISIONS),
    "accelerator": _choice(ACCELERATORS),
    "devices": _devices,
    "deterministic": _deterministic,
    "fast_dev_run": _fast_dev_run,
    "overfit_batches": _overfit,
    "logger": _logger,
    "strategy": _string,
    "profiler": _string,
    **{name: _bool for name in ("enable_progress_bar", "enable_model_summary", "benchmark", "inference_mode",
                                "use_distributed_sampler", "detect_anomaly", "barebones", "sync_batchnorm",
                                "enable_autolog_hparams")},
}


def check_trainer_values(section: Mapping[str, Any]) -> None:
    """Raise a :class:`ConfigError` for the first ``trainer`` value that cannot work."""
    for key, reason in OWNED.items():
        if key in section:
            raise ConfigError(f"trainer.{key}: regfw sets this itself ({reason}). Remove trainer.{key}.",
                              key=f"trainer.{key}")
    max_epochs: Any = section.get("max_epochs")
    steps: Any = section.get("max_steps", -1)
    if not (max_epochs is None and _is_int(steps) and steps >= 1) and (not _is_int(max_epochs) or max_epochs < 1):
        raise _fail("max_epochs", max_epochs, "a whole number of epochs >= 1 such as 20 (or null together with "
                                              "trainer.max_steps >= 1)")
    for key, value in section.items():
        check = CHECKS.get(key)
        if check is not None:
            check(key, value)
    if section.get("logger") == "tensorboard":
        import importlib.util

        if not any(importlib.util.find_spec(name) for name in ("tensorboard", "tensorboardX")):
            raise ConfigError("trainer.logger: got 'tensorboard', which needs the tensorboard package: "
                              "pip install tensorboard (or use trainer.logger: csv).", key="trainer.logger")
