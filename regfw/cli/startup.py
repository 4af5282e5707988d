"""Python's cyclic garbage collector paused while a command starts.

Importing torch, the plugins and (for training) Lightning makes a few hundred thousand objects
that live as long as the process. Every collection that runs while they are being made walks all
of them again: about 0.3 s of CPU in ``regfw plan``, a fifth of ``import torch``, spent finding
no garbage. :func:`pause` stops collection when a command starts; :func:`resume` starts it again
once the command's imports are done: the commands that go on to build or train (``plan``,
``fit``, ``demo``, ``predict``, ``test``, ``rank``) call it before that work; in the process's own
command line the start-up objects are first frozen (:func:`gc.freeze`), so later collections skip
them. The others (``plugins``, ``init``, ``--help``) finish first. :func:`resume` also runs when
the command ends, so a caller of :func:`regfw.cli.main.main` gets its collector back as it was.
"""
from __future__ import annotations

import gc

_state: dict[str, bool] = {}


def pause(*, own_process: bool) -> None:
    """Stop collection until :func:`resume`; ``own_process``: this is the process's own command line
    (``regfw ...``), not a call from inside a longer program."""
    _state.update(enabled=gc.isenabled(), own_process=own_process)
    gc.disable()


def resume() -> None:
    """Collect again, as before :func:`pause` (once; later calls do nothing)."""
    if not _state.pop("enabled", False):
        return
    if _state.get("own_process"):
        gc.freeze()  # the start-up objects are kept to the end anyway: later collections skip them
    gc.enable()
