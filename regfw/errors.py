"""The exceptions regfw raises for problems a user can fix. The CLI prints their message alone."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest_hint(name: str, known: Iterable[str]) -> str:
    """`` Did you mean 'x'?`` for the closest known name, or an empty string."""
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    return f" Did you mean {match[0]!r}?" if match else ""


class RegfwError(Exception):
    """Base class: a problem with the user's input, reported without a traceback by the CLI."""


class ConfigError(RegfwError, ValueError):
    """A config key or value is wrong. The message names the dotted key, the value and the fix."""


class PluginError(RegfwError, RuntimeError):
    """A plugin could not be loaded or registered."""


class RunError(RegfwError, RuntimeError):
    """A run directory or checkpoint problem (exists already, corrupt, mismatched)."""


class NonFiniteLossError(RunError):
    """The training loss became NaN or infinite (``run.on_nan: stop``); raised before the update."""

    def __init__(self, message: str, *, step: int = -1, epoch: int = -1, batch_idx: int = -1) -> None:
        super().__init__(message)
        self.step, self.epoch, self.batch_idx = step, epoch, batch_idx


class RunInterrupted(RunError):
    """Training stopped on a signal (SIGTERM) after saving a checkpoint to resume from."""

    #: The exit status of ``regfw fit``: 128 + SIGTERM, as a shell reports a terminated process.
    exit_code = 143
