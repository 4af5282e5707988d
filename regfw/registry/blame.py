"""Which plugin an exception came from, read from its traceback, and the one line that names it.

A plugin's code runs inside regfw at many places: its hook implementations, its regularizer's
``plan``/``apply``/``rate_for`` and step methods, the modules and callbacks it provides. An
exception raised there is the plugin's to fix (or the user's to avoid by deselecting the plugin),
never a reason to tell the user to change ``model.init_args``. Rather than wrapping each call,
the places that turn exceptions into messages (building the model and plan, training, the CLI)
ask :func:`plugin_error`, which reads the traceback from the outermost frame in:

* a frame in a plugin's module (by :func:`regfw.registry.discovery.origin_of`, or the plugin's top-level
  package) makes that plugin responsible;
* frames of regfw itself and of the libraries everything calls through (torch, Lightning,
  pluggy, the standard library) change nothing: regfw called by a plugin acts for the plugin;
* any other frame (the user's model or data module, a model library) ends the plugin's
  responsibility, and so does a model's ``forward``: a model that fails when a plugin runs it
  is the model's problem.

Whoever is responsible at the frame that raised is named.
"""
from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass
from types import FrameType

from regfw.errors import PluginError, short_repr
from regfw.registry import discovery as plugins
from regfw.registry.discovery import PluginInfo, origin_of, plugin_infos

#: Packages whose frames pass responsibility through unchanged (regfw, and what all code calls).
THROUGH = frozenset({"regfw", "torch", "pytorch_lightning", "lightning_fabric", "lightning", "lightning_utilities",
                     "pluggy", "torchmetrics", "numpy", "omegaconf", "typing_extensions"})


@dataclass(frozen=True)
class Culprit:
    """The plugin responsible for an exception and the function of it that regfw called."""

    info: PluginInfo
    #: The plugin's function that regfw (or a library) called last on the way to the raise
    #: (``MyNoise.plan``, ``MyNoise.make_module`` called by regfw's ``apply``, ``regfw_classify_module``).
    function: str

    @property
    def origin(self) -> str:
        """``plugin 'x' (entry point 'x', distribution regfw-x 1.0)``."""
        dist = (f"distribution {self.info.distribution} {self.info.version or ''}".rstrip()
                if self.info.distribution else "registered at run time")
        return f"plugin {self.info.name!r} (entry point {self.info.name!r}, {dist})"


def _plugin_of(module: str) -> PluginInfo | None:
    info = origin_of(module)
    if info is not None:
        return info
    top = module.partition(".")[0]
    if top in THROUGH or plugins._pm is None:  # no plugin discovered yet: none can have raised (and none is loaded now)
        return None
    try:
        owners = [i for i in plugin_infos() if i.module.partition(".")[0] == top]
    except Exception:  # noqa: BLE001 - discovery itself failing: nothing to attribute
        return None
    return owners[0] if len(owners) == 1 else None


def _is_model_forward(frame: FrameType) -> bool:
    """A ``forward`` of an ``nn.Module`` (the model's own computation)."""
    if frame.f_code.co_name != "forward":
        return False
    owner = frame.f_locals.get("self")
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(owner, torch.nn.Module)


def culprit(exc: BaseException) -> Culprit | None:
    """The plugin responsible for ``exc`` (see the module docstring), or None."""
    owner: PluginInfo | None = None
    entry = ""
    inside = False  # the previous frame was the owner's own code
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        module = str(frame.f_globals.get("__name__", ""))
        info = _plugin_of(module)
        if info is not None:
            if not inside or owner is None or owner.name != info.name:  # called from outside: what regfw asked
                entry = getattr(frame.f_code, "co_qualname", frame.f_code.co_name)
            owner, inside = info, True
            continue
        inside = False
        if _is_model_forward(frame):
            owner = None
            continue
        top = module.partition(".")[0]
        if top in THROUGH or top in sys.stdlib_module_names or not top or top.startswith("_"):
            continue
        owner = None  # the user's code or a library of its own
    return Culprit(owner, entry) if owner is not None else None


def _deselect(info: PluginInfo) -> str:
    """How to run without the plugin: the regularizers it provides, or ``REGFW_LOAD_PLUGINS``."""
    try:
        from regfw.registry.regularizers import get_registry

        names = sorted(s.name for s in get_registry().specs.values() if s.plugin == info.name)
    except Exception:  # noqa: BLE001 - the registry may be what failed
        names = []
    if names:
        return f"remove regularizers.{' / regularizers.'.join(names)} from the config"
    if info.builtin:
        return "leave out the regularizer that needs it"
    return "leave it out with REGFW_LOAD_PLUGINS (the comma-separated plugins to load)"


def plugin_error(exc: BaseException, doing: str, after: str = "", *, quiet: bool = False) -> PluginError | None:
    """A :class:`~regfw.errors.PluginError` naming the plugin responsible for ``exc``, what it
    was doing (``doing``: "while building the model and its plan", "in training step 7") and
    the fix, with ``after`` (what was kept of a run) before the fix; None when no plugin is."""
    found = culprit(exc)
    if found is None:
        return None
    text = short_repr(exc, 200, text=True)
    where = "regfw's" if found.info.builtin else "its authors'"
    return PluginError(
        f"{found.origin} raised {type(exc).__name__}: {text} in {found.function}(), {doing}.{after} The fix is in "
        f"the plugin (report it to {where} issue tracker with `regfw --debug` for the traceback), or deselect "
        f"it: {_deselect(found.info)}.", plugin=found.info.name, method=found.function, quiet=quiet)
