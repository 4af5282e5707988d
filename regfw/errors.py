"""The exceptions regfw raises for problems a user can fix. The CLI prints their message alone."""
from __future__ import annotations


class RegfwError(Exception):
    """Base class: a problem with the user's input, reported without a traceback by the CLI."""


class ConfigError(RegfwError, ValueError):
    """A config key or value is wrong. The message names the dotted key, the value and the fix."""


class PluginError(RegfwError, RuntimeError):
    """A plugin could not be loaded or registered."""


class RunError(RegfwError, RuntimeError):
    """A run directory or checkpoint problem (exists already, corrupt, mismatched)."""
