"""Running a config: the run directory, the Trainer, resuming, and the final evaluation.

Run directories and resume (what ``regfw fit`` does with them):

* a new run gets a new directory ``<run.dir>/<run.name or config stem>-<timestamp>``;
* ``--run-dir DIR`` uses DIR, which must not exist or be empty; ``--force`` replaces a DIR
  that holds an earlier regfw run (it has regfw's ``.regfw-run`` marker), and refuses any other non-empty
  directory;
* ``--resume`` continues the newest run of the config (or the ``--run-dir`` one) from its
  ``checkpoints/last.ckpt``, in that directory; ``--resume PATH`` continues from PATH, in
  PATH's run directory when it lies in one, else in a new run directory. Every resume adds
  ``resume-<k>.yaml`` (the config in effect, and where it resumed from) and continues
  ``metrics.csv``; nothing of the earlier run is rewritten.

Everything that can fail (the config, plugins, model, checkpoint) is checked before the first
file is written, so a failed start never leaves a partial run directory, nor touches a good one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from regfw.config.schema import Config
from regfw.errors import ConfigError, RegfwError, RunError
from regfw.run import console
from regfw.run.atomic import write_atomic

#: The longest file name (bytes) of common file systems: a generated run directory's name must fit.
NAME_MAX = 255


def claim_run_dir(cfg: Config, explicit: str | None = None, *, force: bool = False) -> Any:
    """A fresh run directory, created and locked (a :class:`regfw.run.rundir.Claim`); an existing
    one is never reused silently.

    With ``explicit`` the directory must not exist yet (or must be empty); ``force`` empties
    it first when it holds an earlier regfw run (:func:`regfw.run.rundir.claim_new`). Otherwise it
    is ``<run.dir>/<run.name or config stem>-<timestamp>``, with ``-2``, ``-3`` ... appended when
    that name is taken (created with ``mkdir``, which fails rather than reuse).
    """
    from regfw.run.rundir import claim_new

    if explicit is not None and not str(explicit).strip():
        raise RunError("--run-dir: got an empty path; pass a directory, or leave --run-dir out for a generated one.")
    if explicit:
        return claim_new(Path(explicit), explicit=True, force=force)
    if force:
        raise RunError("--force replaces the --run-dir directory; it needs --run-dir DIR (a generated run "
                       "directory is always new).")
    root = Path(cfg.run.dir)
    stem = cfg.run.name or (Path(cfg.source).stem if cfg.source else "run")
    base = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if len(f"{base}-999".encode()) > NAME_MAX:
        raise ConfigError(f"run.name: got a name of {len(stem)} characters; the run directory's name would be "
                          f"{len(base.encode())} bytes, longer than the {NAME_MAX} a file name may have. Choose a "
                          f"run.name of at most {NAME_MAX - len(base) + len(stem) - 4} characters.", key="run.name")
    for n in range(1, 1000):
        try:
            return claim_new(root / (base if n == 1 else f"{base}-{n}"), explicit=False)
        except FileExistsError:
            continue
    raise RunError(f"could not create a new run directory under {str(root)!r}")


def new_run_dir(cfg: Config, explicit: str | None = None, *, force: bool = False) -> Path:
    """:func:`claim_run_dir`'s directory, its lock released (for callers that only need one)."""
    claim = claim_run_dir(cfg, explicit, force=force)
    claim.release()
    return Path(claim.path)


@dataclass
class FitResult:
    """What a fit produced: where, and the final metrics."""

    run_dir: Path
    config_path: Path
    checkpoint: Path | None
    #: The final evaluation (``train_loss``, ``val_acc``, ...) and the last MC dropout metrics
    #: (``mc/acc``, ``cal/temperature``, ``ood/auroc_msp``, ...), each under its name in metrics.csv.
    metrics: dict[str, float] = field(default_factory=dict)
    plots: dict[str, str] = field(default_factory=dict)
    module: Any = None
    #: The checkpoint this run resumed from (None: a fresh start).
    resumed_from: Path | None = None
    #: This process's global rank; only rank 0 evaluates and reports.
    rank: int = 0


@torch.no_grad()
def evaluate(module: Any, dataloader: Any) -> dict[str, float]:
    """Loss (and accuracy for classification) of ``module`` in eval mode over ``dataloader``."""
    was_training = module.training
    module.eval()
    total, loss_sum, correct = 0, 0.0, 0
    try:
        for batch in dataloader:
            x, y = module.split_batch(batch) if hasattr(module, "split_batch") else batch
            out = module(x)
            loss_sum += float(module.loss_fn(out, y)) * len(y)
            if module.task == "classification":
                correct += int((out.argmax(-1) == y).sum())
            total += len(y)
    finally:
        module.train(was_training)
    result = {"loss": loss_sum / max(total, 1)}
    if module.task == "classification":
        result["acc"] = correct / max(total, 1)
    return result


def build_data(cfg: Config, **options: Any) -> Any:
    """The data module of ``cfg.data``; anything that goes wrong is a :class:`ConfigError` naming
    ``data`` (a wrong ``init_args`` key, a ``class_path`` that is not a LightningDataModule)."""
    from regfw.build.factory import build_datamodule, import_class

    what = cfg.data.class_path or cfg.data.name
    if cfg.data.class_path:
        target = import_class(cfg.data.class_path, "data.class_path")
        if not (isinstance(target, type) and hasattr(target, "train_dataloader")):
            raise ConfigError(f"data.class_path: {cfg.data.class_path!r} is {_kind_of(target)}, not a "
                              f"LightningDataModule class (one with train_dataloader()).", key="data.class_path")
    try:
        datamodule = build_datamodule(cfg.data, seed=cfg.seed, **options)
    except RegfwError:
        raise
    except Exception as exc:  # noqa: BLE001 - a user's data module may fail in any way
        raise ConfigError(f"data: building {what!r} with init_args {dict(cfg.data.init_args)} failed: "
                          f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}. Check data.init_args against "
                          f"its __init__ arguments.", key="data.init_args") from None
    return datamodule


def _kind_of(obj: Any) -> str:
    if isinstance(obj, type):
        return f"the class {obj.__module__}.{obj.__qualname__}"
    if callable(obj):
        return f"the function {getattr(obj, '__qualname__', obj)!s}"
    return f"{type(obj).__name__} {obj!r}"[:80]


def _check_model_target(cfg: Config, datamodule: Any) -> None:
    """``model.class_path`` names an ``nn.Module`` class or factory; the loss fits the data's task."""
    from regfw.build.factory import import_class

    if cfg.model.class_path:
        target = import_class(cfg.model.class_path, "model.class_path")
        if not callable(target) or (isinstance(target, type) and not issubclass(target, torch.nn.Module)):
            raise ConfigError(f"model.class_path: {cfg.model.class_path!r} is {_kind_of(target)}, not a "
                              f"torch.nn.Module class.", key="model.class_path")
    task = getattr(datamodule, "task", None)
    loss = cfg.model.loss
    if task == "classification" and loss in ("mse", "gaussian_nll"):
        raise ConfigError(f"model.loss: got {loss!r}, a regression loss, but data "
                          f"{cfg.data.name or cfg.data.class_path!r} "
                          f"is a classification task; use cross_entropy (or auto).", key="model.loss")
    if task == "regression" and loss == "cross_entropy":
        raise ConfigError(f"model.loss: got 'cross_entropy', a classification loss, but data "
                          f"{cfg.data.name or cfg.data.class_path!r} is a regression task; use mse, gaussian_nll "
                          f"(or auto).", key="model.loss")


def build_module(cfg: Config, datamodule: Any) -> Any:
    """The :class:`~regfw.train.module.RegularizedModule` for ``cfg`` and its data."""
    from regfw.build.datasets import describe_data
    from regfw.build.factory import model_config_for, resolve_loss
    from regfw.train.module import RegularizedModule
    from regfw.train.optim import optimizer_spec

    _check_model_target(cfg, datamodule)
    n_train, example, notes = describe_data(datamodule, cfg.data.batch)
    model_config = model_config_for(cfg.model, datamodule)
    with _building(model_config, example):
        module = RegularizedModule(
            model=None,
            loss=resolve_loss(cfg.model, datamodule),
            regularizers=cfg.take_regularizers(),
            optimizer=optimizer_spec(cfg.optimizer),
            lr_scheduler=dataclasses.asdict(cfg.lr_scheduler) if cfg.lr_scheduler else None,
            batch=cfg.data.batch,
            n_examples=n_train,
            example_input=example,
            model_config=model_config,
            on_nan=cfg.run.on_nan,
            output_key=cfg.model.output_key,
        )
        if notes:
            module.plan.notes["data"] = notes
        return module


def build_plan(cfg: Config, data: Any) -> Any:
    """The :class:`~regfw.placement.plan.Plan` that :func:`build_module` would apply, without Lightning.

    For ``regfw plan``: the same steps as :class:`~regfw.train.module.RegularizedModule` (model from the
    config, regularizer objects, the plan made on a zero batch shaped like the data's example
    input, then applied, so apply-time warnings show), and the same errors, but neither the
    LightningModule nor a LightningDataModule is built (``data`` may be a plain data object:
    ``factory.build_datamodule(..., lightning=False)``).
    """
    from regfw.build.factory import build_model, model_config_for, resolve_loss
    from regfw.placement.plan import apply_plan, make_plan

    _check_model_target(cfg, data)
    example = data.example_input() if hasattr(data, "example_input") else None
    model_config = model_config_for(cfg.model, data)
    with _building(model_config, example):
        resolve_loss(cfg.model, data)
        model = build_model(model_config)
        regularizers = cfg.take_regularizers()
        zeros = None if example is None else torch.zeros(list(example.shape), dtype=example.dtype)
        plan = make_plan(model, regularizers, getattr(data, "n_train", None), zeros)
        apply_plan(model, regularizers, plan)
        return plan


@contextlib.contextmanager
def _building(model_config: dict, example: Any) -> Iterator[None]:
    """Building the model and its plan: an exception that is not a :class:`RegfwError` is reported as
    :func:`_building_error` names it (the plugin that raised, or the model not fitting the data)."""
    try:
        yield
    except RegfwError:
        raise
    except Exception as exc:  # noqa: BLE001 - a plugin's code may raise anything; it is named, not the model
        error = _building_error(exc, model_config, example)
        if error is exc:
            raise
        raise error from exc


def _building_error(exc: Exception, model_config: dict, example: Any) -> Exception:
    """What building the model and its plan failing is reported as: the plugin whose code raised
    (:mod:`regfw.registry.blame`), else the model not fitting the data, else ``exc`` itself."""
    from regfw.registry.blame import plugin_error

    blamed = plugin_error(exc, "while building the model and its plan")
    if blamed is not None:
        return blamed
    if isinstance(exc, (RuntimeError, ValueError, TypeError, AttributeError, IndexError, KeyError)):
        return _model_error(exc, model_config, example)
    return exc


def _model_error(exc: Exception, model_config: dict, example: Any) -> ConfigError:
    """Most often the model does not fit the data: its forward pass on one batch is what fails."""
    name = model_config.get("name") or model_config.get("class_path")
    batch = (f" on the data's example batch (shape {list(example.shape)}, {str(example.dtype).replace('torch.', '')})"
             if example is not None else "")
    return ConfigError(f"model: building {name!r} with init_args {model_config.get('init_args') or {}}{batch} "
                       f"failed: {type(exc).__name__}: {exc}. If the shapes disagree, set model.init_args "
                       f"(e.g. in_features, num_outputs) to match the data.")


def uncertainty_callback(cfg: Config, module: Any, plot_dir: Path, heldout: Any = None) -> Any | None:
    """The MC dropout callback for ``cfg.uncertainty``, or None when it is off.

    It is off when ``uncertainty.enabled`` is false or the model has no stochastic module (for
    example a run without a dropout regularizer); it is never an error to leave it on.
    """
    from regfw.train.module import split_mean_variance
    from regfw.uncertainty import MCDropoutUncertainty, stochastic_modules

    unc = cfg.uncertainty
    if not unc.enabled:
        return None
    if not stochastic_modules(module):
        import warnings

        warnings.warn("regfw: uncertainty.enabled is true, but the model has no active dropout (no dropout "
                      "regularizer, or all its rates are 0): MC dropout uncertainty is off for this run. Select a "
                      "dropout regularizer, or set uncertainty.enabled: false.", stacklevel=2)
        return None
    return MCDropoutUncertainty.from_config(
        unc, task=module.task, plot_dir=str(plot_dir),
        output_transform=split_mean_variance if module.hparams.loss == "gaussian_nll" else None,
        calibrate=heldout is not None and heldout.calibration is not None,
        calibration_loader=heldout.calibration if heldout is not None else None,
        ood_loader=heldout.ood if heldout is not None else None,
    )


def load_resume_config(path: str | None, overrides: Sequence[str] = (), checkpoint: str | None = None,
                       run_dir: str | None = None) -> Config:
    """:func:`~regfw.config.schema.load_config` for ``--resume``: a regularizer whose plugin is gone is
    reported as such, naming the checkpoint and the plugin (and distribution) it came from."""
    from regfw.config.schema import load_raw, validate
    from regfw.run.checkpoint_compat import missing_plugins
    from regfw.run.checkpoints import read_checkpoint, resume_target

    raw = load_raw(path, overrides)
    source = str(path) if path else None
    try:
        return validate(raw, source=source)
    except ConfigError as exc:
        try:
            ckpt_path, _ = resume_target(validate(raw, source=source, check_plugins=False), checkpoint, run_dir)
            ckpt = read_checkpoint(ckpt_path, verify=False)
        except RegfwError:
            raise exc from None
        from regfw.registry.regularizers import get_registry

        gone = missing_plugins(ckpt, get_registry())
        if not gone:
            raise
        raise RunError(f"cannot resume from checkpoint {str(ckpt_path)!r}: it was trained with {', '.join(gone)}, "
                       f"which no installed plugin provides ({exc}). Reinstall that plugin (`regfw plugins` lists "
                       f"what is installed) and resume again.") from None


def _trainer_plugins(trainer_args: dict) -> list:
    """The config's ``trainer.plugins`` plus :class:`~regfw.run.checkpoints.AtomicCheckpointIO`
    unless the config brings a checkpoint IO of its own."""
    from lightning_fabric.plugins import CheckpointIO

    from regfw.run.checkpoints import AtomicCheckpointIO

    plugins = trainer_args.pop("plugins", None) or []
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


def _processes(trainer_cfg: dict) -> int:
    """How many processes ``trainer.devices`` x ``trainer.num_nodes`` ask for (1 when not stated)."""
    devices, nodes = trainer_cfg.get("devices", 1), trainer_cfg.get("num_nodes", 1)
    if isinstance(devices, (list, tuple)):
        count = len(devices)
    elif isinstance(devices, int) or (isinstance(devices, str) and devices.strip().isdigit()):
        count = int(devices)
    else:  # "auto", -1: known only once Lightning looked at the machine
        count = 1
    return max(count, 1) * (nodes if isinstance(nodes, int) and nodes > 0 else 1)


def _check_settings(cfg: Config, world_size: int) -> None:
    """Settings that cannot work with ``world_size`` processes (checked before anything is written)."""
    if world_size > 1 and cfg.run.on_nan == "skip":
        raise ConfigError(f"run.on_nan: got 'skip' with {world_size} processes; Lightning cannot leave a batch "
                          f"out on every process at once. Use 'stop' (or 'ignore').")


def _check_distributed(cfg: Config, trainer: Any, datamodule: Any) -> None:
    """Settings that cannot work, or would mislead, with several processes."""
    from pytorch_lightning.utilities import rank_zero_warn

    if trainer.world_size <= 1:
        return
    _check_settings(cfg, trainer.world_size)
    try:
        n_val = len(datamodule.val_dataloader().dataset)
    except Exception:  # noqa: BLE001 - any data module without a sized validation set
        return
    if n_val % trainer.world_size:
        rank_zero_warn(f"regfw: the validation set has {n_val} examples, not a multiple of {trainer.world_size} "
                       f"processes; Lightning's DistributedSampler repeats "
                       f"{trainer.world_size - n_val % trainer.world_size} "
                       f"of them, so validation (and MC) metrics count those twice.")


def _resume_note(path: Path, ckpt_path: Path, ckpt: dict, cfg: Config) -> str:
    """``resume-<k>.yaml``: the config in effect from this resume on, and where it resumed from."""
    k = 1
    while (path / f"resume-{k}.yaml").exists():
        k += 1
    header = (f"# resumed {time.strftime('%Y-%m-%d %H:%M:%S')} from {ckpt_path} "
              f"(epoch {ckpt.get('epoch')}, global step {ckpt.get('global_step')})\n")
    write_atomic(path / f"resume-{k}.yaml", header + cfg.to_yaml())
    return f"resume-{k}.yaml"


def _last_good(ckpt_cb: Any) -> str:
    last = ckpt_cb.last_model_path
    if not last or not Path(last).is_file():
        return ("none: no checkpoint was written before it (set run.checkpoint_every_n_steps to write "
                "checkpoints/last.ckpt more often)")
    step = f" (global step {ckpt_cb.last_saved_step})" if ckpt_cb.last_saved_step is not None else ""
    return f"{last}{step}"


def _plugin_failure(exc: Exception, trainer: Any, ckpt_cb: Any, cfg: Config, rank: int) -> Any:
    """A plugin's code raising during training: the :class:`~regfw.errors.PluginError` naming it,
    the step, and the checkpoint the run keeps to continue from (or that nothing was kept), or
    None when no plugin raised it (:mod:`regfw.registry.blame`)."""
    from regfw.registry.blame import plugin_error

    last = ckpt_cb.last_model_path
    if last and Path(last).is_file():
        src = cfg.source or "CONFIG"
        kept = (f" The run directory is kept; its last checkpoint is {last}: once the plugin is fixed, continue "
                f"with `regfw fit {src} --resume {last}`.")
    else:
        kept = " No checkpoint was written before it, so nothing of the run was kept."
    import traceback

    # Lightning resets its stage while it tears down after the exception: the loop it was in is on the traceback
    loops = {str(f.f_globals.get("__name__", "")).rpartition(".")[2] for f, _ in traceback.walk_tb(exc.__traceback__)}
    doing = (f"during validation after training step {trainer.global_step} (epoch {trainer.current_epoch})"
             if "evaluation_loop" in loops else
             f"in training step {trainer.global_step + 1} (epoch {trainer.current_epoch})")
    return plugin_error(exc, doing, kept, quiet=rank != 0)


def fit(cfg: Config, *, run_dir: str | None = None, callbacks: Sequence[Any] = (), quiet: bool = False,
        resume: None | bool | str | Path = None, force: bool = False) -> FitResult:
    """Train ``cfg`` in a new run directory (or continue a run) and evaluate the result.

    Args:
        run_dir: use this directory (new or empty; see ``force``) instead of a generated one.
        resume: ``True`` continues the newest run of ``cfg`` (or ``run_dir``) from its
            ``checkpoints/last.ckpt``; a path continues from that checkpoint. The checkpoint is
            read and compared with ``cfg`` before anything is written.
        force: replace ``run_dir`` when it holds an earlier regfw run.

    Under DDP every process runs this; Lightning's launcher passes rank 0's run directory and
    checkpoint on to the others, and only rank 0 writes files and evaluates.
    """
    import pytorch_lightning as pl

    from regfw.run import checkpoints as C
    from regfw.run import distributed as D
    from regfw.run.checkpoint_compat import check_compatible

    rank = D.env_rank()
    if run_dir is not None and not str(run_dir).strip():
        raise RunError("--run-dir: got an empty path; pass a directory, or leave --run-dir out for a generated one.")
    explicit = run_dir or D.shared_run_dir()
    if D.launched_externally() and not explicit:
        raise RunError(f"this process (rank {rank}) is one of several started by a launcher (torchrun, srun); all of "
                       f"them must write to one run directory: pass --run-dir DIR (or set {D.RUN_DIR_ENV}=DIR)")
    if resume and force:
        raise RunError("--resume continues a run and --force replaces one; pass only one of them")
    if force and not run_dir:
        raise RunError("--force replaces the --run-dir directory; it needs --run-dir DIR (a generated run "
                       "directory is always new).")
    if rank != 0 and resume and os.environ.get(D.RESUME_ENV):
        resume = os.environ[D.RESUME_ENV]  # the checkpoint rank 0 chose
    ckpt_path: Path | None = None
    resume_dir: Path | None = None
    if resume:
        ckpt_path, resume_dir = C.resume_target(cfg, None if resume is True else str(resume), explicit)

    # Build and check everything before writing anything.
    _check_settings(cfg, _processes(cfg.trainer))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = D.make_resumable(build_data(cfg), cfg.seed)
    from regfw.uncertainty.heldout import prepare_heldout

    heldout = prepare_heldout(datamodule, cfg.uncertainty, cfg.seed)  # calibration split, OOD set
    module = build_module(cfg, datamodule)
    ckpt: dict = {}
    if ckpt_path is not None:
        ckpt = C.read_checkpoint(ckpt_path)
        check_compatible(ckpt, module, ckpt_path, cfg.source)

    if ckpt_path is not None:
        C.check_loop_state(ckpt, ckpt_path, cfg.trainer)

    from regfw.run import stopping

    claim = None
    path: Path | None = None
    if rank != 0:
        if not explicit:
            raise RunError(f"this process (rank {rank}) found no run directory from rank 0; pass --run-dir DIR "
                           f"(or set {D.RUN_DIR_ENV}=DIR)")
        path = Path(explicit)  # rank 0 made it and writes into it
    try:
        if rank == 0:
            from regfw.run.rundir import claim_existing

            with stopping.deferred():  # a signal waits until the claim is whole (and is then undone below)
                claim = (claim_existing(resume_dir) if resume_dir is not None
                         else claim_run_dir(cfg, explicit, force=force))
                path = claim.path
        assert path is not None
        with console.quiet_lightning(in_memory=console.holds_tensors(datamodule)):
            return _train(cfg, path, claim, module, datamodule, ckpt_path, ckpt, callbacks, quiet, rank, heldout)
    except BaseException as exc:
        with stopping.deferred(drop=True):  # a signal must not cut the clean-up short
            if claim is not None and not claim.keep:
                claim.abandon()  # nothing half-made: a start that failed before its first checkpoint leaves nothing
        signum = stopping.signal_of(exc)
        if signum is not None:  # before _train's trainer existed: nothing was trained in this start
            raise stopping.stopped(signum, cfg, path, claim, ckpt_path, ckpt, rank=rank) from None
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise RunError(_no_space(exc, cfg, path, claim, ckpt_path)) from None
        raise
    finally:
        if claim is not None:
            claim.release()


def _no_space(exc: OSError, cfg: Config, path: Path | None, claim: Any, ckpt_path: Path | None) -> str:
    """A full disk: the file, and what the run has to continue from (its newest complete checkpoint:
    ``last.ckpt``, else the newest ``epoch=NNN.ckpt``), or that nothing of it was kept."""
    src = cfg.source or "CONFIG"
    head = f"no space left on device writing {exc.filename or path}"
    if path is None or (claim is not None and not claim.keep and claim.created):
        return f"{head}; nothing of the run was kept. Free some space and start it again."
    last = path / "checkpoints" / "last.ckpt"
    if last.is_file():
        return (f"{head}; the older files of the run are intact, its newest complete checkpoint is {last}. Free "
                f"some space and continue with `regfw fit {src} --run-dir {path} --resume`.")
    epochs = sorted((path / "checkpoints").glob("epoch=*.ckpt"), key=lambda p: p.stat().st_mtime)
    newest = epochs[-1] if epochs else ckpt_path
    if newest is None:
        return f"{head}; the run has no complete checkpoint to continue from. Free some space and start it again."
    return (f"{head}; the older files of the run are intact, its newest complete checkpoint is {newest}. Free some "
            f"space and continue with `regfw fit {src} --resume {newest}`.")


def _train(cfg: Config, path: Path, claim: Any, module: Any, datamodule: Any, ckpt_path: Path | None, ckpt: dict,
           callbacks: Sequence[Any], quiet: bool, rank: int, heldout: Any = None) -> FitResult:
    """The part of :func:`fit` that runs in the claimed run directory ``path``."""
    import pytorch_lightning as pl
    from pytorch_lightning.trainer.states import TrainerStatus
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from regfw.errors import NonFiniteLossError, Terminated
    from regfw.run import checkpoints as C
    from regfw.run import distributed as D
    from regfw.run import stopping

    config_path = path / "config.yaml"
    if claim is not None:
        if ckpt_path is None or not config_path.exists():
            claim.write("config.yaml", cfg.to_yaml())
            claim.write("plan.txt", module.plan.format() + "\n")
        if ckpt_path is not None:
            claim.written.append(_resume_note(path, ckpt_path, ckpt, cfg))

    ckpt_cb = C.RunCheckpoint(path / "checkpoints", every_n_steps=cfg.run.checkpoint_every_n_steps)
    trainer_args = {**console.trainer_defaults(cfg.trainer, datamodule, _processes(cfg.trainer)), **cfg.trainer}
    if quiet:
        trainer_args.update(enable_progress_bar=False, enable_model_summary=False)
    plugins = _trainer_plugins(trainer_args)
    logger = trainer_args.pop("logger", None)
    if logger is None or logger is True or logger == "csv":
        logger = C.RunCSVLogger(path, keep_until_step=ckpt.get("global_step") if ckpt else None)
    elif logger == "tensorboard":
        from pytorch_lightning.loggers import TensorBoardLogger

        logger = TensorBoardLogger(save_dir=str(path), name="tensorboard", version="")
    mc = uncertainty_callback(cfg, module, path / "plots", heldout)
    trainer = pl.Trainer(
        **trainer_args,
        plugins=plugins,
        default_root_dir=str(path),
        logger=logger,
        callbacks=[D.StepSeeding(cfg.seed), ckpt_cb, *([mc] if mc else []), *callbacks],
    )
    _check_distributed(cfg, trainer, datamodule)
    announce = (D.announce_to_child_processes(str(path), str(ckpt_path) if ckpt_path else None)
                if rank == 0 and trainer.world_size > 1 else contextlib.nullcontext())
    start_step = int(ckpt.get("global_step") or 0)
    if claim is not None:
        ckpt_cb.on_save = claim.keep_run  # from the first checkpoint on, a failed run is kept for --resume

    def stopped(signum: int, during: str = "") -> RunError:
        return stopping.stopped(signum, cfg, path, claim, ckpt_path, ckpt, trainer, ckpt_cb, during, rank)

    sigint = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    try:
        with announce:
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
    except NonFiniteLossError as exc:
        error: RunError = RunError(
            f"{exc}. Last good checkpoint: {_last_good(ckpt_cb)}. Lower optimizer.lr (or clip gradients with "
            f"trainer.gradient_clip_val) and start a new run, or set run.on_nan=skip to leave such batches out.",
            quiet=rank != 0)  # every rank stops alike; rank 0 reports
        raise error from None
    except SIGTERMException:  # Lightning's handler had it: training stopped after a batch
        raise stopped(signal.SIGTERM) from None
    except (Terminated, KeyboardInterrupt) as exc:  # before Lightning's handler, or after its teardown
        raise stopped(stopping.signal_of(exc) or signal.SIGTERM,
                      "as Lightning finished" if stopping.finished(trainer) else "") from None
    except SystemExit as exc:
        if trainer.state.status != TrainerStatus.INTERRUPTED:
            raise
        if sigint is not None:  # Lightning ignores a second Ctrl-C from here on; this handler decides again
            signal.signal(signal.SIGINT, sigint)
        del exc
        raise stopped(signal.SIGINT) from None
    except RegfwError:
        raise
    except Exception as exc:  # noqa: BLE001 - a plugin's code may raise anything during training
        blamed = _plugin_failure(exc, trainer, ckpt_cb, cfg, rank)
        if blamed is not None:
            raise blamed from exc
        if trainer.global_step > start_step or not isinstance(
                exc, (RuntimeError, ValueError, TypeError, AttributeError, IndexError, KeyError)):
            raise
        # the first training step failed: the model, its loss or the data do not fit together
        name = cfg.model.name or cfg.model.class_path
        text = " ".join(str(exc).split())
        raise ConfigError(f"model: the first training step of {name!r} with {module.hparams.loss} loss on "
                          f"{cfg.data.name or cfg.data.class_path!r} failed: {type(exc).__name__}: {text[:300]}. "
                          f"Check that the model's forward returns one tensor of the shape the loss expects "
                          f"(model.loss, model.init_args).", key="model") from None
    if getattr(trainer, "received_sigterm", False):  # it came after Lightning's last look at it
        raise stopped(signal.SIGTERM, "as Lightning finished")
    last = Path(ckpt_cb.last_model_path) if ckpt_cb.last_model_path else None
    if last is None and ckpt_cb.last_path.is_file():
        last = ckpt_cb.last_path  # written by spawned processes (ddp_spawn), whose callbacks stay there
    if rank != 0 or not trainer.is_global_zero:
        return FitResult(path, config_path, last, module=module, resumed_from=ckpt_path, rank=rank)
    plots: dict[str, str] = {}
    try:
        metrics = {}
        train_loader = getattr(datamodule, "train_eval_dataloader", datamodule.train_dataloader)()
        for split, loader in (("train", train_loader), ("val", datamodule.val_dataloader())):
            for name, value in evaluate(module, loader).items():
                metrics[f"{split}_{name}"] = value
        if mc is not None:
            metrics.update(mc.last_metrics)  # under their names in metrics.csv: mc/acc, cal/temperature, ...
            plots = dict(mc.flush_plots())
    except (Terminated, KeyboardInterrupt) as exc:
        raise stopped(stopping.signal_of(exc) or signal.SIGTERM, "during the final evaluation") from None
    return FitResult(path, config_path, last, metrics, plots=plots, module=module, resumed_from=ckpt_path)
