"""``regfw.extend``: everything a regularizer plugin may use, in one place.

The built-in plugins (``plugins/``, import package ``regfw_plugins``) and the template of
``regfw new-plugin`` import only from here and from :mod:`regfw.layers` (the stochastic layers);
``docs/plugins.md`` says what each name is for. These names are kept stable across minor versions;
the modules they live in are not: import them from here.

Names are imported on first use, so ``import regfw.extend`` costs nothing and no internal module
imports this door.
"""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from regfw import hookimpl

if TYPE_CHECKING:  # pragma: no cover - for type checkers: the same names, imported eagerly
    from regfw.config.schema import (  # noqa: F401
        check_finite,
        nonneg,
        positive,
        rate,
        validate_dataclass,
    )
    from regfw.errors import (  # noqa: F401
        ConfigError,
        PluginError,
        RegfwError,
    )
    from regfw.extend.regularizer import (  # noqa: F401
        InjectingRegularizer,
        InjectionConfig,
        PlanContext,
        PlanItem,
        Regularizer,
    )
    from regfw.placement import kinds  # noqa: F401
    from regfw.placement.api import (  # noqa: F401
        INJECTED_PREFIX,
        LayerInfo,
        ModelMap,
        ResidualSite,
        after_anchor,
        analyse,
        classify,
        classify_model,
        injected_name,
        is_dropout,
        is_path_drop,
        model_map,
        plan_residual_rows,
        planned_module,
        rate_slot,
        residual_branches,
        reuse_existing,
        set_rate,
        unrecognised_attention,
    )
    from regfw.placement.kinds import (  # noqa: F401
        ATTENTION,
        CONV,
        CONV_TYPES,
        EMBEDDING,
        HIDDEN,
        INPUT,
        RATE_KINDS,
        RECURRENT,
        RESIDUAL,
        RateRange,
        choose_rate,
        transformer_ranges,
    )
    from regfw.registry.discovery import plugin_infos  # noqa: F401
    from regfw.registry.regularizers import build_regularizers, get_registry  # noqa: F401
    from regfw.train.batch import (  # noqa: F401
        batch_size,
        concat_batches,
        index_batch,
    )
    from regfw.train.params import (  # noqa: F401
        DecaySetConfig,
        DecaySetRegularizer,
    )
    from regfw.train.schedules import (  # noqa: F401
        RateSchedule,
        is_active,
    )
    from regfw.train.step_hooks import (  # noqa: F401
        BeforeOptimizerStepCallback,
        LearnedRatesCallback,
        StepPostHookCallback,
    )
    from regfw.train.steps import (  # noqa: F401
        MixedTargets,
        Step,
        compute_loss,
        require_classification,
    )
    from regfw.uncertainty import stochastic_modules  # noqa: F401

_LAZY: dict[str, str] = {
    # the base classes and their plan rows
    "Regularizer": "regfw.extend.regularizer",
    "InjectingRegularizer": "regfw.extend.regularizer",
    "InjectionConfig": "regfw.extend.regularizer",
    "PlanItem": "regfw.extend.regularizer",
    "PlanContext": "regfw.extend.regularizer",
    # config fields a regularizer's Config dataclass uses
    "rate": "regfw.config.schema",
    "nonneg": "regfw.config.schema",
    "positive": "regfw.config.schema",
    "check_finite": "regfw.config.schema",
    "validate_dataclass": "regfw.config.schema",
    # errors a plugin raises for what a user can fix
    "RegfwError": "regfw.errors",
    "ConfigError": "regfw.errors",
    "PluginError": "regfw.errors",
    # layer kinds and the rate table
    "INPUT": "regfw.placement.kinds",
    "HIDDEN": "regfw.placement.kinds",
    "CONV": "regfw.placement.kinds",
    "RECURRENT": "regfw.placement.kinds",
    "ATTENTION": "regfw.placement.kinds",
    "RESIDUAL": "regfw.placement.kinds",
    "EMBEDDING": "regfw.placement.kinds",
    "RATE_KINDS": "regfw.placement.kinds",
    "CONV_TYPES": "regfw.placement.kinds",
    "RateRange": "regfw.placement.kinds",
    "choose_rate": "regfw.placement.kinds",
    "transformer_ranges": "regfw.placement.kinds",
    # reading a model and changing it as planned
    "ModelMap": "regfw.placement.api",
    "LayerInfo": "regfw.placement.api",
    "model_map": "regfw.placement.api",
    "analyse": "regfw.placement.api",
    "classify": "regfw.placement.api",
    "classify_model": "regfw.placement.api",
    "after_anchor": "regfw.placement.api",
    "reuse_existing": "regfw.placement.api",
    "injected_name": "regfw.placement.api",
    "INJECTED_PREFIX": "regfw.placement.api",
    "set_rate": "regfw.placement.api",
    "is_dropout": "regfw.placement.api",
    "is_path_drop": "regfw.placement.api",
    "planned_module": "regfw.placement.api",
    "ResidualSite": "regfw.placement.api",
    "residual_branches": "regfw.placement.api",
    "plan_residual_rows": "regfw.placement.api",
    # attention blocks, found by what they compute, and where their probability dropout is set
    "rate_slot": "regfw.placement.api",
    "unrecognised_attention": "regfw.placement.api",
    # one training step
    "Step": "regfw.train.steps",
    "MixedTargets": "regfw.train.steps",
    "compute_loss": "regfw.train.steps",
    "require_classification": "regfw.train.steps",
    # batches
    "batch_size": "regfw.train.batch",
    "index_batch": "regfw.train.batch",
    "concat_batches": "regfw.train.batch",
    # weight penalties
    "DecaySetConfig": "regfw.train.params",
    "DecaySetRegularizer": "regfw.train.params",
    # rate schedules
    "RateSchedule": "regfw.train.schedules",
    "is_active": "regfw.train.schedules",
    # Lightning callbacks at points of the optimizer step
    "BeforeOptimizerStepCallback": "regfw.train.step_hooks",
    "StepPostHookCallback": "regfw.train.step_hooks",
    "LearnedRatesCallback": "regfw.train.step_hooks",
    # the registry of regularizers and the plugins found, for a plugin's own tests
    "get_registry": "regfw.registry.regularizers",
    "build_regularizers": "regfw.registry.regularizers",
    "plugin_infos": "regfw.registry.discovery",
    "stochastic_modules": "regfw.uncertainty",
}

#: the module of layer kinds itself (``kinds.HIDDEN``, ``kinds.RATE_TABLE``)
_MODULES = {"kinds": "regfw.placement.kinds"}

__all__ = ["hookimpl", "kinds", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return import_module(_MODULES[name])
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'regfw.extend' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
