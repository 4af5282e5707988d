"""Which layers the ``coadaptation`` plugin measures: read off the model, without Lightning, so
that a plan can print them (:meth:`regfw_plugins.coadaptation.Coadaptation.describe`) and the
monitor (:mod:`regfw_plugins.coadaptation.monitor`) can hook them.

By default every hidden (``nn.Linear``) and conv layer except the output layer, at the output of
the module a dropout would be inserted after (:func:`regfw.placement.api.after_anchor`: past the
norm and activation layers that consume the layer's output), i.e. the post-activation units.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from regfw.extend import after_anchor, analyse, classify
from regfw.extend import kinds as K

__all__ = ["unit_layers"]


def unit_layers(model: nn.Module, example_input: Any = None, layers: Any = None) -> dict[str, int]:
    """The modules whose outputs are measured, as ``{path: unit_dim}``.

    ``layers`` None: the default described in the module docstring (read with
    :func:`regfw.placement.api.analyse`; ``example_input`` lets a traced forward pass decide which
    layer is the output layer and what follows each layer). Otherwise a list of module paths (units on the last
    dimension, or dimension 1 for conv layers) or a mapping ``{path: unit_dim}``.
    """
    names = dict(model.named_modules())
    if layers is not None:
        chosen = dict(layers) if isinstance(layers, Mapping) else {str(p): None for p in layers}
        out: dict[str, int] = {}
        for path, dim in chosen.items():
            if path not in names:
                known = [n for n in names if n][:8]
                raise ValueError(
                    f"co-adaptation layer {path!r} is not a module path of {type(model).__name__}; "
                    f"module paths look like {', '.join(map(repr, known))}"
                )
            if dim is None:
                dim = 1 if classify(names[path], path) == K.CONV else -1
            out[path] = int(dim)
        return out
    mm = analyse(model, example_input)
    out = {}
    for info in mm.layers:
        if info.kind not in (K.HIDDEN, K.CONV) or info.is_output:
            continue
        anchor, _, _ = after_anchor(mm, info.path)
        out[anchor] = 1 if info.kind == K.CONV else -1
    return out
