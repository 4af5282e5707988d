"""``Regularize``: regfw's regularizers on a LightningModule of one's own, as a Lightning callback.

The user's module stays as it is: its own ``training_step``, ``configure_optimizers`` and
logging. ``Trainer(callbacks=[Regularize({"dropout": {}, "weight_decay": {}})])`` then

1. at ``setup`` plans and applies the regularizers to the module's network (the module itself,
   or the submodule named by ``target``), exactly as :class:`~regfw.train.module.RegularizedModule`
   does (the same :func:`regfw.placement.plan.make_plan`, so ``regfw plan`` / :meth:`Regularize.plan_for`
   print what is done);
2. gives the regularizers' optimizer parameter groups (weight decay's decay / no-decay split) to
   the user's optimizer: each of the user's groups is split by the regularizer's groups, keeping
   the user's settings (lr, betas...) and the scheduler's per-group state; a weight decay the
   user set explicitly (not the optimizer's default) beside a regularizer that sets its own is
   a :class:`~regfw.errors.ConfigError`, as the weights would be decayed twice;
3. adds the regularizers' loss terms (:func:`regfw.train.steps.add_terms`: ``penalty(model)``,
   R-Drop's KL term, the confidence penalty) to the loss the user's ``training_step``
   returns. The step is wrapped at setup (and unwrapped at teardown), so the term is part of
   the one loss Lightning backpropagates: exact, and correct under AMP loss scaling, gradient
   accumulation and DDP, where a second, separate backward of the term (from a gradient-side
   hook) would be scaled wrongly or break DDP's one-backward-per-forward reducer. The terms see
   the step's batch (inputs and targets by ``batch``, a :class:`~regfw.train.batch.BatchFormat`), the
   network's last output in the step and the user's loss as the data loss; they are logged
   per epoch as ``train_penalty`` and ``train_penalty/<name>``;
4. runs the regularizers' own callbacks (constraints, decoupled decay, rate schedules).

What needs :class:`~regfw.train.module.RegularizedModule` instead: regularizers with a **batch
transform** (mixup, cutmix) or a **loss transform** (label smoothing), since only the module
that computes the loss can mix its targets or change its loss function; and modules with manual
optimization (they backpropagate inside ``training_step``: call :func:`regfw.train.steps.add_terms`
there). Selecting one is a :class:`~regfw.errors.ConfigError` at setup naming it.

Checkpoints: the callback's state (kept by Lightning in the checkpoint) holds what rebuilds the
same structure; :func:`load_regularized` (``load_regularized(MyModule, path)``) is the
one-line replacement for ``MyModule.load_from_checkpoint(path)``. A plain
``MyModule.load_from_checkpoint(path)`` cannot rebuild the regularizers (no regfw code runs when
Lightning builds a module from a checkpoint, and the inserted layers have no parameters, so a
strict load would pass without them); the callback therefore puts one marker entry
(:data:`LOAD_MARK`) into the checkpoint's ``state_dict``, which the plain class does not have:
its strict load fails with an error naming ``regfw.load_regularized``. ``load_regularized`` and a
Trainer with the callback (``trainer.fit(..., ckpt_path=...)``, which continues exactly) drop
the marker before loading. The checkpoint is sealed with regfw's digest
(:func:`regfw.run.checkpoints.seal`), which ``load_regularized`` verifies.
"""
from __future__ import annotations

import functools
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from regfw import __version__
from regfw.build.datasets import describe_data
from regfw.config.imports import import_class
from regfw.errors import ConfigError, RunError
from regfw.extend.contract import check_callbacks, check_groups
from regfw.extend.regularizer import Regularizer
from regfw.model_io import OutputKey, check_output_key, example_from_spec, example_spec, model_output, select_output
from regfw.placement.plan import Plan, apply_plan, make_plan
from regfw.placement.surgery import is_dropout
from regfw.registry.regularizers import build_regularizers
from regfw.run.checkpoints import safe_load, seal_in_hook, unreadable, verify_checkpoint
from regfw.train.batch import BatchFormat, batch_size, split_batch
from regfw.train.epoch_metrics import EpochMeans
from regfw.train.module import _regularizer_section
from regfw.train.optim import optimizers_and_schedulers, split_groups
from regfw.train.steps import add_terms

__all__ = ["Regularize", "load_regularized", "callback_needs_module"]

#: Where the callback puts what rebuilds a checkpoint's structure (also in ``checkpoint["regfw"]``).
STATE_MARK = "regfw_regularize"
#: The ``state_dict`` entry that makes a plain ``load_from_checkpoint`` (strict) of a checkpoint
#: written with :class:`Regularize` fail, naming the function that restores the regularizers.
LOAD_MARK = "__regfw__: trained with regfw.Regularize; load with regfw.load_regularized(cls, path)"


def callback_needs_module(reg: Regularizer) -> str | None:
    """Why ``reg`` cannot act on a user's own ``training_step`` (None when it can)."""
    for method, what in (("transform_batch", "transforms the batch (its targets)"),
                         ("transform_loss", "transforms the loss function")):
        if getattr(type(reg), method, None) is not getattr(Regularizer, method, None):
            return what
    return None


class Regularize(pl.Callback):
    """Apply regfw regularizers to a LightningModule of one's own (see the module docstring).

    Args:
        regularizers: a ``regularizers:`` config mapping (``{"dropout": {"hidden": 0.3}}``) or
            :class:`~regfw.Regularizer` objects.
        target: the attribute path of the network to regularize inside the module (``"net"``,
            ``"encoder"``); None: the LightningModule itself.
        n_examples: the training-set size for the rate policy; None: the data module's
            ``n_train`` or the training dataset's length, when known.
        example_input: one input batch to trace; None: ``module.example_input_array``, the data
            module's ``example_input()`` or its first training batch.
        batch: where inputs and targets sit in a batch, for the loss terms (a
            :class:`~regfw.train.batch.BatchFormat` or ``{"inputs": ..., "targets": ...}``; a dict batch
            such as Hugging Face's: the dict minus its label keys, see :mod:`regfw.train.batch`).
        output_key: which tensor of the network's output the loss terms read (R-Drop, the
            confidence penalty): :func:`regfw.model_io.select_output`; None: a tensor, else the
            ``logits`` of a ``ModelOutput`` or dict, else the lone tensor.
    """

    def __init__(self, regularizers: Mapping[str, Any] | Sequence[Regularizer], target: str | None = None,
                 n_examples: int | None = None, example_input: Any = None,
                 batch: BatchFormat | Mapping[str, Any] | None = None, output_key: OutputKey = None) -> None:
        super().__init__()
        self.section = _regularizer_section(regularizers)
        if isinstance(regularizers, Mapping):
            self.regularizers: list[Regularizer] = build_regularizers(self.section)
        else:
            self.regularizers = list(regularizers)
        for reg in self.regularizers:
            why = callback_needs_module(reg)
            if why:
                raise ConfigError(f"regularizers.{reg.name}: {why}, which a callback cannot do to a LightningModule's "
                                  f"own training_step; train with regfw.RegularizedModule (or `regfw fit`) to use it, "
                                  f"or remove regularizers.{reg.name}.")
        self.target = target
        self.n_examples = n_examples
        self.example_input = example_input
        self.batch_format = BatchFormat.coerce(batch)
        self.output_key = check_output_key(output_key)
        self.plan: Plan | None = None
        self._applied_to: nn.Module | None = None
        self._input_shape: Any = None  #: :func:`regfw.model_io.example_spec` of the example
        self._input_dtype: Any = None
        self._means = EpochMeans()
        self._last_output: Any = None
        self._hook: Any = None
        self._extra: list[pl.Callback] = []

    # -- planning ---------------------------------------------------------------------------------
    def network(self, pl_module: nn.Module) -> nn.Module:
        """The regularized network: ``pl_module`` or its submodule ``target``."""
        if not self.target:
            return pl_module
        try:
            return pl_module.get_submodule(self.target)
        except AttributeError:
            names = [n for n, _ in pl_module.named_children()]
            raise ConfigError(f"Regularize(target={self.target!r}): {type(pl_module).__name__} has no submodule "
                              f"{self.target!r}; its children are {', '.join(names) or '(none)'}.") from None

    def plan_for(self, pl_module: nn.Module, datamodule: Any = None) -> Plan:
        """The plan for ``pl_module`` (nothing is changed): what :meth:`setup` applies."""
        n, example, notes = self._data_facts(pl_module, datamodule)
        plan = make_plan(self.network(pl_module), self.regularizers, n, example)
        if notes:
            plan.notes["data"] = notes
        return plan

    def _data_facts(self, pl_module: nn.Module, datamodule: Any) -> tuple[int | None, Any, list[str]]:
        n, example = self.n_examples, self.example_input
        notes: list[str] = []
        if example is None and self._input_shape is not None:
            example = example_from_spec(self._input_shape, self._input_dtype)
        if example is None:
            example = getattr(pl_module, "example_input_array", None)
        if datamodule is not None and (n is None or example is None):
            dn, dex, notes = describe_data(datamodule, self.batch_format)
            n = n if n is not None else dn
            example = example if example is not None else dex
        elif n is None:
            notes = ["no training-set size (pass Regularize(n_examples=...)); the rate policy took N as unknown"]
        return n, example, notes

    # -- setup: structure, optimizer groups, the wrapped step ------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._applied_to is not pl_module:
            self.apply(pl_module, getattr(trainer, "datamodule", None))
        self._wrap_loading(pl_module)
        if stage == "fit":
            if not pl_module.automatic_optimization:
                raise ConfigError(f"Regularize: {type(pl_module).__name__} uses manual optimization (it calls "
                                  f"backward itself), so the callback cannot add the loss terms; call "
                                  f"regfw.train.steps.add_terms(...) in its training_step instead.")
            self._wrap(pl_module)
            callbacks: list = trainer.callbacks  # type: ignore[attr-defined]
            known = {id(c) for c in callbacks}
            self._extra = [cb for reg in self.regularizers for cb in check_callbacks(reg, reg.callbacks())
                           if id(cb) not in known]
            callbacks.extend(self._extra)  # before the checkpoint restores their state

    def apply(self, pl_module: nn.Module, datamodule: Any = None) -> Plan:
        """Plan and apply the regularizers to ``pl_module``'s network (once)."""
        plan = self.plan_for(pl_module, datamodule)
        example = plan.context.example_input
        if isinstance(example, (torch.Tensor, Mapping, tuple)):
            self._input_shape, self._input_dtype = example_spec(example)
        apply_plan(self.network(pl_module), self.regularizers, plan)
        self.plan, self._applied_to = plan, pl_module
        return plan

    def _wrap(self, pl_module: pl.LightningModule) -> None:
        if getattr(pl_module.training_step, "_regfw_wrapped", False):
            return
        user_step = pl_module.training_step
        user_configure = pl_module.configure_optimizers
        callback = self

        def training_step(module: pl.LightningModule, *args: Any, **kwargs: Any) -> Any:
            callback._last_output = None
            out = user_step(*args, **kwargs)
            return callback._add_terms(module, args[0] if args else kwargs.get("batch"), out,
                                       args[1] if len(args) > 1 else kwargs.get("batch_idx", 0))

        def configure_optimizers(module: pl.LightningModule) -> Any:
            result = user_configure()
            callback._give_groups(module, result)
            return result

        training_step._regfw_wrapped = True  # type: ignore[attr-defined]
        pl_module.training_step = types.MethodType(training_step, pl_module)  # type: ignore[method-assign]
        pl_module.configure_optimizers = types.MethodType(configure_optimizers, pl_module)  # type: ignore[method-assign]
        if any(type(r).loss_term is not Regularizer.loss_term for r in self.regularizers):
            self._hook = self.network(pl_module).register_forward_hook(self._record_output)

    @staticmethod
    def _wrap_loading(pl_module: pl.LightningModule) -> None:
        """Drop :data:`LOAD_MARK` from a checkpoint Lightning restores into ``pl_module`` (the module's
        ``on_load_checkpoint`` runs before its strict ``load_state_dict``; callbacks' hooks after it)."""
        if getattr(pl_module.on_load_checkpoint, "_regfw_wrapped", False):
            return
        user_hook = pl_module.on_load_checkpoint

        def on_load_checkpoint(module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
            user_hook(checkpoint)
            (checkpoint.get("state_dict") or {}).pop(LOAD_MARK, None)

        on_load_checkpoint._regfw_wrapped = True  # type: ignore[attr-defined]
        pl_module.on_load_checkpoint = types.MethodType(on_load_checkpoint, pl_module)  # type: ignore[method-assign]

    def _record_output(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        if _module.training:
            self._last_output = output

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for name in ("training_step", "configure_optimizers", "on_load_checkpoint"):
            if name in pl_module.__dict__:
                del pl_module.__dict__[name]  # the class's own methods again
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        callbacks: list = trainer.callbacks  # type: ignore[attr-defined]
        for cb in self._extra:
            if cb in callbacks:
                callbacks.remove(cb)
        self._extra = []

    # -- the loss terms ---------------------------------------------------------------------------
    def _add_terms(self, pl_module: pl.LightningModule, batch: Any, out: Any, batch_idx: int) -> Any:
        loss = out.get("loss") if isinstance(out, Mapping) else out
        if not isinstance(loss, torch.Tensor):
            return out  # None: the user skips this batch
        inputs, targets = split_batch(batch, self.batch_format)
        network = self.network(pl_module)
        outputs = self._last_output
        if outputs is not None:
            outputs = select_output(outputs, self.output_key)
        total, terms = add_terms(self.regularizers, network, inputs, targets, outputs, loss,
                                 batch_idx=batch_idx, module=pl_module,
                                 forward=functools.partial(model_output, network, output_key=self.output_key))
        if terms:
            n = batch_size(inputs)
            self._means.add("train_penalty", total.detach() - loss.detach(), n)
            for name, term in terms.items():
                self._means.add(f"train_penalty/{name}", term, n)
        if isinstance(out, Mapping):
            return {**out, "loss": total}
        return total

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name, value in self._means.pop(trainer.strategy).items():
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=True)

    # -- optimizer groups -------------------------------------------------------------------------
    def _groups(self, network: nn.Module) -> tuple[str | None, list[dict] | None]:
        found = [(reg.name, g) for reg in self.regularizers
                 if (g := check_groups(reg, reg.param_groups(network))) is not None]
        if len(found) > 1:
            raise ConfigError(f"regularizers: {found[0][0]!r} and {found[1][0]!r} both define optimizer parameter "
                              f"groups; select only one of them")
        return found[0] if found else (None, None)

    def _give_groups(self, pl_module: pl.LightningModule, configured: Any) -> None:
        owner, groups = self._groups(self.network(pl_module))
        if groups is None:
            return
        optimizers, schedulers = optimizers_and_schedulers(configured)
        for optimizer in optimizers:
            split_groups(optimizer, groups, owner or "", [s for s in schedulers if s.optimizer is optimizer])

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {STATE_MARK: True, "regularizers": self.section, "target": self.target,
                "n_examples": self.plan.context.n_examples if self.plan is not None else self.n_examples,
                "input_shape": self._input_shape, "input_dtype": self._input_dtype,
                "batch": self.batch_format.as_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("regularizers", self.section) != self.section:
            raise RunError(f"Regularize: the checkpoint was trained with regularizers {state_dict['regularizers']!r}, "
                           f"this callback has {self.section!r}; resume with the same regularizers.")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        network = self.network(pl_module)
        checkpoint["regfw"] = {
            "version": __version__, "callback": True, "regularizers": sorted(self.section),
            "module_class": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}",
            "state": self.state_dict(),
            "rates": {name: float(m.p) for name, m in network.named_modules()
                      if is_dropout(m) and isinstance(getattr(m, "p", None), (int, float))},
        }
        checkpoint.setdefault("hyper_parameters", dict(pl_module.hparams))
        if isinstance(checkpoint.get("state_dict"), dict):
            checkpoint["state_dict"][LOAD_MARK] = torch.zeros(0)

        seal_in_hook(checkpoint, trainer)  # over what it holds now, unless AtomicCheckpointIO seals the file

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        _restore_rates(self.network(pl_module), checkpoint)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(target=self.target)


def _restore_rates(network: nn.Module, checkpoint: Mapping[str, Any]) -> None:
    modules = dict(network.named_modules())
    for name, p in ((checkpoint.get("regfw") or {}).get("rates") or {}).items():
        if name in modules and is_dropout(modules[name]):
            modules[name].p = p


def load_regularized(cls: type[pl.LightningModule] | None, checkpoint: str | Path, *,
                     accept_unverified: bool | None = None, accept_version: bool | None = None,
                     **kwargs: Any) -> pl.LightningModule:
    """``cls.load_from_checkpoint(checkpoint, **kwargs)`` for a module trained with :class:`Regularize`:
    the same regularized structure (the plan applied again from the checkpoint's callback state,
    dropout rates as saved), then the weights loaded strictly, in eval mode.

    ``cls`` None: the module class recorded in the checkpoint. The checkpoint is verified first
    (:func:`regfw.run.checkpoints.verify_checkpoint`): one without its digest, with edited content
    or from another regfw version is a :class:`~regfw.errors.RunError` unless
    ``accept_unverified`` / ``accept_version`` is True (None: as the command's flags say).
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise RunError(f"checkpoint {str(path)!r} does not exist or is not a file; pass the .ckpt file itself.")
    try:
        ckpt = safe_load(path)  # data only: nothing in the file runs before it is verified
    except Exception as exc:  # noqa: BLE001 - every reason a file cannot be read is named by what the file is
        raise RunError(f"checkpoint {str(path)!r} {unreadable(path, exc)} and cannot be loaded.") from None
    meta = (ckpt.get("regfw") or {}) if isinstance(ckpt, Mapping) else {}
    state = meta.get("state")
    if not meta.get("callback") or not isinstance(state, Mapping):
        raise RunError(f"checkpoint {str(path)!r} was not written with regfw.Regularize in the Trainer (no callback "
                       f"state); load it with its module's load_from_checkpoint.")
    verify_checkpoint(ckpt, path, accept_unverified=accept_unverified, accept_version=accept_version)
    if cls is None:
        cls = import_class(meta["module_class"], "checkpoint module_class")
    kwargs.setdefault("map_location", "cpu")
    module = cls.load_from_checkpoint(path, strict=False, **kwargs)
    callback = Regularize(state["regularizers"], target=state.get("target"), n_examples=state.get("n_examples"),
                          batch=state.get("batch"))
    callback._input_shape, callback._input_dtype = state.get("input_shape"), state.get("input_dtype")
    callback.apply(module)
    weights = {k: v for k, v in ckpt["state_dict"].items() if k != LOAD_MARK}
    module.load_state_dict(weights, strict=True)
    _restore_rates(callback.network(module), ckpt)
    setattr(module, "regfw_plan", callback.plan)  # noqa: B010 - a plain attribute, not a submodule
    return module.eval()
