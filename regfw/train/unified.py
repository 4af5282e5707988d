"""regfw's Lightning classes for the unified ``lightning`` package (``import lightning.pytorch as L``).

``pytorch_lightning`` and ``lightning.pytorch`` are two copies of one code base whose classes do
not mix: a ``lightning.pytorch.Trainer`` refuses a ``pytorch_lightning.Callback`` and the other
way round. regfw's classes are written against ``pytorch_lightning``; this module gives the same
classes as ``lightning.pytorch`` ones (each a subclass of both), for a Trainer, a LightningCLI or
a YAML ``class_path`` of the unified package::

    from regfw.train.unified import MCDropoutUncertainty, Regularize, RegularizedModule
    L.Trainer(callbacks=[Regularize({"dropout": {}}), MCDropoutUncertainty()])

Importing it without the ``lightning`` package installed is an ImportError saying so.
"""
from __future__ import annotations

try:
    import lightning.pytorch as L
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("regfw.train.unified needs the unified `lightning` package (pip install lightning); with "
                      "pytorch_lightning use regfw.train.regularize, regfw.train.module and regfw.uncertainty "
                      "instead") from exc

from regfw.train.module import RegularizedModule as _RegularizedModule
from regfw.train.regularize import Regularize as _Regularize
from regfw.uncertainty.callback import MCDropoutUncertainty as _MCDropoutUncertainty

__all__ = ["MCDropoutUncertainty", "Regularize", "RegularizedModule"]


# The two packages declare the same hooks in two base classes, which mypy reports as incompatible
# (misc); without `lightning` installed the base is Any and the ignore is unused.
class Regularize(_Regularize, L.Callback):  # type: ignore[misc, unused-ignore]
    __doc__ = _Regularize.__doc__


class MCDropoutUncertainty(_MCDropoutUncertainty, L.Callback):  # type: ignore[misc, unused-ignore]
    __doc__ = _MCDropoutUncertainty.__doc__


class RegularizedModule(_RegularizedModule, L.LightningModule):  # type: ignore[misc, unused-ignore]
    __doc__ = _RegularizedModule.__doc__


def _prefer_unified(cls: type, base: type, own: type) -> None:
    """Every member ``base`` (``L.LightningModule``) has and ``own`` does not define itself is taken
    from ``base``: the ``lightning.pytorch`` Trainer compares hooks with its own class to see what
    is overridden, and must see regfw's overrides only."""
    import torch.nn as nn

    taken: set[str] = set()
    for klass in base.__mro__:
        if klass in nn.Module.__mro__:
            continue
        for name, raw in vars(klass).items():  # raw descriptors: staticmethods stay static
            if name.startswith("__") or name in vars(own) or name in taken:
                continue
            taken.add(name)
            setattr(cls, name, raw)


_prefer_unified(RegularizedModule, L.LightningModule, _RegularizedModule)
