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
import errno
import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from regfw.build.fit import FitParts, build_fit
from regfw.config.schema import Config, load_raw, validate
from regfw.errors import ConfigError, NonFiniteLossError, RegfwError, RunError, Terminated
from regfw.registry.blame import plugin_error
from regfw.registry.regularizers import get_registry
from regfw.run import checkpoints as C
from regfw.run import console, stopping
from regfw.run import distributed as D
from regfw.run.atomic import write_atomic
from regfw.run.checkpoint_compat import check_compatible, missing_plugins
from regfw.run.checkpoints import AtomicCheckpointIO, read_checkpoint, resume_target
from regfw.run.rundir import claim_existing, claim_new

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


def load_resume_config(path: str | None, overrides: Sequence[str] = (), checkpoint: str | None = None,
                       run_dir: str | None = None) -> Config:
    """:func:`~regfw.config.schema.load_config` for ``--resume``: a regularizer whose plugin is gone is
    reported as such, naming the checkpoint and the plugin (and distribution) it came from."""

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
    built = build_fit(cfg)
    module, datamodule = built.module, built.datamodule
    ckpt: dict = {}
    if ckpt_path is not None:
        ckpt = C.read_checkpoint(ckpt_path)
        check_compatible(ckpt, module, ckpt_path, cfg.source)

    if ckpt_path is not None:
        C.check_loop_state(ckpt, ckpt_path, cfg.trainer)


    claim = None
    path: Path | None = None
    if rank != 0:
        if not explicit:
            raise RunError(f"this process (rank {rank}) found no run directory from rank 0; pass --run-dir DIR "
                           f"(or set {D.RUN_DIR_ENV}=DIR)")
        path = Path(explicit)  # rank 0 made it and writes into it
    try:
        if rank == 0:

            with stopping.deferred():  # a signal waits until the claim is whole (and is then undone below)
                claim = (claim_existing(resume_dir) if resume_dir is not None
                         else claim_run_dir(cfg, explicit, force=force))
                path = claim.path
        assert path is not None
        with console.quiet_lightning(in_memory=console.holds_tensors(datamodule)):
            return _train(cfg, path, claim, built, ckpt_path, ckpt, callbacks, quiet, rank)
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


def _train(cfg: Config, path: Path, claim: Any, built: FitParts, ckpt_path: Path | None, ckpt: dict,
           callbacks: Sequence[Any], quiet: bool, rank: int) -> FitResult:
    """The part of :func:`fit` that runs in the claimed run directory ``path``."""
    from pytorch_lightning.trainer.states import TrainerStatus
    from pytorch_lightning.utilities.exceptions import SIGTERMException


    module, datamodule, mc = built.module, built.datamodule, built.uncertainty
    if mc is not None:
        mc.plot_dir = str(path / "plots")  # the run directory is known once claimed, after the build
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
    trainer = pl.Trainer(
        **trainer_args,
        plugins=plugins,
        default_root_dir=str(path),
        logger=logger,
        callbacks=[D.StepSeeding(cfg.seed), ckpt_cb, *built.callbacks, *callbacks],
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
        raise ConfigError(f"model: the first training step of {name!r} with {built.parts.loss} loss on "
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
