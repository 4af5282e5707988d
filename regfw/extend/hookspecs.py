"""The hook specifications of regfw: everything a plugin can contribute.

A plugin is a module (usually named by an entry point in the ``regfw`` group) that implements
some of these hooks with the ``@regfw.hookimpl`` marker. The hooks are few and broad, and are
called at load time or once per model, never once per batch: per-step behaviour lives in the
regularizer's own step methods (``transform_batch``, ``transform_loss``, ``loss_term``), in the
modules it injects and in the Lightning callbacks it provides.

An implementation that raises is reported as its plugin's failure, naming the plugin, the hook
and what regfw was doing (:mod:`regfw.registry.blame`), never as a problem of the user's model.

Every hook here is documented in ``docs/hooks.md``; a test fails if one is not.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:  # pragma: no cover - typing only
    from torch import nn

hookspec = pluggy.HookspecMarker("regfw")


@hookspec
def regfw_register_regularizers(register: Callable[..., None]) -> None:
    """Register regularizer classes.

    Called once each time the registry is built. Call ``register(cls)`` for each
    :class:`regfw.Regularizer` subclass the plugin provides; ``cls.name`` is the name users
    select in the config and ``cls.Config`` the dataclass its config section is validated
    against. Registering a name that another plugin already registered is an error naming both.

    Example::

        @regfw.hookimpl
        def regfw_register_regularizers(register):
            register(MyNoise)
    """


@hookspec(firstresult=True)
def regfw_classify_module(module: nn.Module, path: str) -> str | None:
    """Return the layer kind of ``module`` (found at dotted ``path`` in the model), or None.

    Called once per module while a model is planned. The first non-None answer wins; when
    every plugin returns None the built-in type table of :mod:`regfw.placement.kinds` decides. The
    answer must be one of :data:`regfw.placement.kinds.KINDS` (``"hidden"``, ``"conv"``,
    ``"recurrent"``, ``"attention"``, ``"norm"``, ``"activation"``) or ``"skip"`` to exclude the
    module from every regularizer. Use it for custom layer types, matched by type, never by
    class-name substring.

    Example::

        @regfw.hookimpl
        def regfw_classify_module(module, path):
            if isinstance(module, MyGatedLinear):
                return "hidden"
    """


@hookspec
def regfw_stochastic_types() -> Sequence[type]:  # type: ignore[empty-body]  # a spec: pluggy never runs its body
    """Return module types that Monte Carlo dropout must switch to training mode.

    Called when MC dropout prepares a model. torch's dropout modules and every
    :class:`regfw.layers.StochasticModule` are known already; declare here a custom stochastic
    module that does not subclass :class:`regfw.layers.StochasticModule`.

    Example::

        @regfw.hookimpl
        def regfw_stochastic_types():
            return [MyNoiseLayer]
    """
