"""Which unverifiable regfw checkpoints a command accepts, knowingly (no torch import: the CLI sets it).

A regfw checkpoint is refused when its digest is missing, of an older format, or no longer matches
its content (``--accept-unverified``), or when another regfw version wrote it
(``--accept-version``); :func:`regfw.run.checkpoints.verify_checkpoint` does the checks. The CLI
flags set the acceptance for the duration of one command (:func:`accepting`); the Python API
(:func:`regfw.run.checkpoints.read_checkpoint`, :func:`regfw.train.regularize.load_regularized`) takes the
same choices as keyword arguments, which override it.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Acceptance:
    """What is accepted: ``unverified`` (no, an older or a mismatching digest) and ``version``
    (written by another regfw version)."""

    unverified: bool = False
    version: bool = False
    #: The notices already printed: a command that reads one checkpoint twice says it once.
    said: set[str] = field(default_factory=set, compare=False, repr=False)


#: How each acceptance is asked for, on the command line and in Python.
FLAGS = {"unverified": ("--accept-unverified", "accept_unverified=True"),
         "version": ("--accept-version", "accept_version=True")}

_NONE = Acceptance()
_CURRENT: ContextVar[Acceptance | None] = ContextVar("regfw_checkpoint_acceptance", default=None)


def current() -> Acceptance:
    """The acceptance in force (none unless inside :func:`accepting`)."""
    return _CURRENT.get() or _NONE


@contextmanager
def accepting(unverified: bool = False, version: bool = False) -> Iterator[Acceptance]:
    """Accept unverified checkpoints and/or those of another regfw version inside the block."""
    token = _CURRENT.set(Acceptance(unverified=unverified, version=version))
    try:
        yield current()
    finally:
        _CURRENT.reset(token)


def how_to_accept(kind: str) -> str:
    """``"pass --accept-X (accept_X=True in Python)"`` for ``kind`` in :data:`FLAGS`."""
    flag, keyword = FLAGS[kind]
    return f"pass {flag} ({keyword} in Python)"


def notice(text: str) -> None:
    """One ``regfw: notice:`` line on stderr: what was accepted, so that it is never silent (once
    per command, or once per process outside one)."""
    line = f"regfw: notice: {' '.join(text.split())}"
    said = current().said
    if line not in said:
        said.add(line)
        print(line, file=sys.stderr)
