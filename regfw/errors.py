"""The exceptions regfw raises for problems a user can fix. The CLI prints their message alone.

Every class takes the message as its one positional argument (as before) plus optional keyword
fields, so code that raises ``ConfigError("...")`` keeps working:

* ``quiet``: the CLI prints nothing (other processes of a multi-process run leave the report to
  rank 0, which raises the same error);
* ``key`` (:class:`ConfigError`): the dotted config key, for tools that want it separately;
* ``plugin``, ``method`` (:class:`PluginError`): which plugin gave the bad answer, to which hook
  or method.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest_hint(name: str, known: Iterable[str]) -> str:
    """`` Did you mean 'x'?`` for the closest known name, or an empty string."""
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    return f" Did you mean {match[0]!r}?" if match else ""


def short_repr(value: object, limit: int = 80, *, text: bool = False) -> str:
    """``repr(value)`` (``str`` with ``text=True``) on one line, cut to ``limit`` characters: how
    messages quote a value without flooding the line."""
    out = " ".join((str(value) if text else repr(value)).split())
    return out if len(out) <= limit else out[: limit - 3] + "..."


class RegfwError(Exception):
    """Base class: a problem with the user's input, reported without a traceback by the CLI."""

    #: The exit status of the CLI for this error.
    exit_code = 2

    def __init__(self, message: str = "", *, quiet: bool = False) -> None:
        super().__init__(message)
        #: True: the CLI prints nothing (another process reports the same error).
        self.quiet = quiet


class ConfigError(RegfwError, ValueError):
    """A config key or value is wrong. The message names the dotted key, the value and the fix."""

    def __init__(self, message: str = "", *, key: str | None = None, quiet: bool = False) -> None:
        super().__init__(message, quiet=quiet)
        #: The dotted config key at fault, where the raiser knows it.
        self.key = key


class PluginError(RegfwError, RuntimeError):
    """A plugin could not be loaded or registered, or answered a hook or method wrongly."""

    def __init__(self, message: str = "", *, plugin: str | None = None, method: str | None = None,
                 quiet: bool = False) -> None:
        super().__init__(message, quiet=quiet)
        #: The plugin (or regularizer) at fault and the hook or method it answered, where known.
        self.plugin, self.method = plugin, method


class RunError(RegfwError, RuntimeError):
    """A run directory or checkpoint problem (exists already, corrupt, mismatched)."""


class OutputError(RunError):
    """A file regfw was asked to write cannot be written where asked: something is there that regfw
    must not replace, or the file system refused (full, read-only, a name too long)."""


class NonFiniteLossError(RunError):
    """The training loss became NaN or infinite (``run.on_nan: stop``); raised before the update."""

    def __init__(self, message: str = "", *, step: int = -1, epoch: int = -1, batch_idx: int = -1,
                 quiet: bool = False) -> None:
        super().__init__(message, quiet=quiet)
        self.step, self.epoch, self.batch_idx = step, epoch, batch_idx


class RunInterrupted(RunError):
    """Training stopped on a signal after saving a checkpoint to resume from."""

    #: The exit status of ``regfw fit``: 128 + SIGTERM, as a shell reports a terminated process.
    exit_code = 143

    def __init__(self, message: str = "", *, exit_code: int | None = None, quiet: bool = False) -> None:
        super().__init__(message, quiet=quiet)
        if exit_code is not None:
            self.exit_code = exit_code


class Terminated(BaseException):
    """SIGTERM outside the training loop (start-up, the final evaluation), raised by the CLI's
    handler; a ``BaseException`` so that no ``except Exception`` on the way swallows it."""
