"""Running a config: the run directory, the Trainer, resuming, and the final evaluation.

Run directories and resume (what ``regfw fit`` does with them):

* a new run gets a new directory ``<run.dir>/<run.name or config stem>-<timestamp>``;
* ``--run-dir DIR`` uses DIR, which must not exist or be empty; ``--force`` replaces a DIR
  that holds an earlier regfw run (it has a ``config.yaml``), and refuses any other non-empty
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
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from regfw.atomic import write_atomic
from regfw.config import Config
from regfw.errors import ConfigError, RegfwError, RunError


def _clear_run_dir(path: Path) -> None:
    """Delete the contents of an earlier regfw run directory (``--force``)."""
    import shutil

    if not (path / "config.yaml").is_file():
        raise RunError(f"run directory {str(path)!r} is not empty and holds no regfw run (no config.yaml); "
                       f"--force replaces only an earlier regfw run. Choose a new or empty directory.")
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def new_run_dir(cfg: Config, explicit: str | None = None, *, force: bool = False) -> Path:
    """A fresh run directory; an existing one is never reused silently.

    With ``explicit`` the directory must not exist yet (or must be empty); ``force`` empties
    it first when it holds an earlier regfw run. Otherwise it is
    ``<run.dir>/<run.name or config stem>-<timestamp>``, with ``-2``, ``-3`` ... appended when
    that name is taken (created with ``mkdir``, which fails rather than reuse).
    """
    if explicit:
        path = Path(explicit)
        if path.exists() and not path.is_dir():
            raise RunError(f"run directory {str(path)!r} is a file; choose a directory.")
        if path.exists() and any(path.iterdir()):
            if not force:
                raise RunError(f"run directory {str(path)!r} exists and is not empty; choose a new one, continue "
                               f"it with `regfw fit CONFIG --run-dir {path} --resume`, or replace it with --force")
            _clear_run_dir(path)
        path.mkdir(parents=True, exist_ok=True)
        return path
    root = Path(cfg.run.dir)
    root.mkdir(parents=True, exist_ok=True)
    stem = cfg.run.name or (Path(cfg.source).stem if cfg.source else "run")
    base = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in range(1, 1000):
        path = root / (base if n == 1 else f"{base}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RunError(f"could not create a new run directory under {str(root)!r}")


@dataclass
class FitResult:
    """What a fit produced: where, and the final metrics."""

    run_dir: Path
    config_path: Path
    checkpoint: Path | None
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


def build_module(cfg: Config, datamodule: Any) -> Any:
    """The :class:`~regfw.module.RegularizedModule` for ``cfg`` and its data."""
    from regfw.data import describe_data
    from regfw.factory import model_config_for, resolve_loss
    from regfw.module import RegularizedModule
    from regfw.optim import optimizer_spec

    n_train, example, notes = describe_data(datamodule, cfg.data.batch)
    model_config = model_config_for(cfg.model, datamodule)
    try:
        module = RegularizedModule(
            model=None,
            loss=resolve_loss(cfg.model, datamodule),
            regularizers=cfg.regularizers,
            optimizer=optimizer_spec(cfg.optimizer),
            lr_scheduler=dataclasses.asdict(cfg.lr_scheduler) if cfg.lr_scheduler else None,
            batch=cfg.data.batch,
            n_examples=n_train,
            example_input=example,
            model_config=model_config,
            on_nan=cfg.run.on_nan,
        )
        if notes:
            module.plan.notes["data"] = notes
        return module
    except RegfwError:
        raise
    except (RuntimeError, ValueError) as exc:
        raise _model_error(exc, model_config, example) from exc


def build_plan(cfg: Config, data: Any) -> Any:
    """The :class:`~regfw.plan.Plan` that :func:`build_module` would apply, without Lightning.

    For ``regfw plan``: the same steps as :class:`~regfw.module.RegularizedModule` (model from the
    config, regularizer objects, the plan made on a zero batch shaped like the data's example
    input, then applied, so apply-time warnings show), and the same errors, but neither the
    LightningModule nor a LightningDataModule is built (``data`` may be a plain data object:
    ``factory.build_datamodule(..., lightning=False)``).
    """
    from regfw.factory import build_model, model_config_for, resolve_loss
    from regfw.plan import apply_plan, make_plan
    from regfw.registry import build_regularizers

    example = data.example_input() if hasattr(data, "example_input") else None
    model_config = model_config_for(cfg.model, data)
    try:
        resolve_loss(cfg.model, data)
        model = build_model(model_config)
        regularizers = build_regularizers(dict(cfg.regularizers or {}))
        zeros = None if example is None else torch.zeros(list(example.shape), dtype=example.dtype)
        plan = make_plan(model, regularizers, getattr(data, "n_train", None), zeros)
        apply_plan(model, regularizers, plan)
        return plan
    except RegfwError:
        raise
    except (RuntimeError, ValueError) as exc:
        raise _model_error(exc, model_config, example) from exc


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
    from regfw.module import split_mean_variance
    from regfw.uncertainty import MCDropoutUncertainty, stochastic_modules

    unc = cfg.uncertainty
    if not unc.enabled or not stochastic_modules(module):
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
    """:func:`~regfw.config.load_config` for ``--resume``: a regularizer whose plugin is gone is
    reported as such, naming the checkpoint and the plugin (and distribution) it came from."""
    from regfw.checkpoints import missing_plugins, read_checkpoint, resume_target
    from regfw.config import load_raw, validate

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
        from regfw.registry import get_registry

        gone = missing_plugins(ckpt, get_registry().names())
        if not gone:
            raise
        raise RunError(f"cannot resume from checkpoint {str(ckpt_path)!r}: it was trained with {', '.join(gone)}, "
                       f"which no installed plugin provides ({exc}). Reinstall that plugin (`regfw plugins` lists "
                       f"what is installed) and resume again.") from None


def _trainer_plugins(trainer_args: dict) -> list:
    """The config's ``trainer.plugins`` plus :class:`~regfw.checkpoints.AtomicCheckpointIO`
    unless the config brings a checkpoint IO of its own."""
    from lightning_fabric.plugins import CheckpointIO

    from regfw.checkpoints import AtomicCheckpointIO

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
                       f"processes; Lightning's DistributedSampler repeats {trainer.world_size - n_val % trainer.world_size} "
                       f"of them, so validation (and MC) metrics count those twice.")


def _resume_note(path: Path, ckpt_path: Path, ckpt: dict, cfg: Config) -> None:
    """``resume-<k>.yaml``: the config in effect from this resume on, and where it resumed from."""
    k = 1
    while (path / f"resume-{k}.yaml").exists():
        k += 1
    header = (f"# resumed {time.strftime('%Y-%m-%d %H:%M:%S')} from {ckpt_path} "
              f"(epoch {ckpt.get('epoch')}, global step {ckpt.get('global_step')})\n")
    write_atomic(path / f"resume-{k}.yaml", header + cfg.to_yaml())


def _last_good(ckpt_cb: Any) -> str:
    last = ckpt_cb.last_model_path
    if not last or not Path(last).is_file():
        return ("none: no checkpoint was written before it (set run.checkpoint_every_n_steps to write "
                "checkpoints/last.ckpt more often)")
    step = f" (global step {ckpt_cb.last_saved_step})" if ckpt_cb.last_saved_step is not None else ""
    return f"{last}{step}"


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
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from regfw import checkpoints as C
    from regfw import distributed as D
    from regfw.errors import NonFiniteLossError, RunInterrupted
    from regfw.factory import build_datamodule

    rank = D.env_rank()
    explicit = run_dir or D.shared_run_dir()
    if D.launched_externally() and not explicit:
        raise RunError(f"this process (rank {rank}) is one of several started by a launcher (torchrun, srun); all of "
                       f"them must write to one run directory: pass --run-dir DIR (or set {D.RUN_DIR_ENV}=DIR)")
    if resume and force:
        raise RunError("--resume continues a run and --force replaces one; pass only one of them")
    if rank != 0 and resume and os.environ.get(D.RESUME_ENV):
        resume = os.environ[D.RESUME_ENV]  # the checkpoint rank 0 chose
    ckpt_path: Path | None = None
    resume_dir: Path | None = None
    if resume:
        ckpt_path, resume_dir = C.resume_target(cfg, None if resume is True else str(resume), explicit)

    # Build and check everything before writing anything.
    _check_settings(cfg, _processes(cfg.trainer))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = D.make_resumable(build_datamodule(cfg.data, seed=cfg.seed), cfg.seed)
    from regfw.uncertainty.heldout import prepare_heldout

    heldout = prepare_heldout(datamodule, cfg.uncertainty, cfg.seed)  # calibration split, OOD set
    module = build_module(cfg, datamodule)
    ckpt: dict = {}
    if ckpt_path is not None:
        ckpt = C.read_checkpoint(ckpt_path)
        C.check_compatible(ckpt, module, ckpt_path, cfg.source)

    if rank != 0:
        path = Path(explicit)  # rank 0 made it and writes into it
    elif resume_dir is not None:
        path = resume_dir
    else:
        path = new_run_dir(cfg, explicit, force=force)
    config_path = path / "config.yaml"
    if rank == 0:
        if resume_dir is None:
            write_atomic(config_path, cfg.to_yaml())
            write_atomic(path / "plan.txt", module.plan.format() + "\n")
        if ckpt_path is not None:
            _resume_note(path, ckpt_path, ckpt, cfg)

    ckpt_cb = C.RunCheckpoint(path / "checkpoints", every_n_steps=cfg.run.checkpoint_every_n_steps)
    trainer_args = dict(cfg.trainer)
    if quiet:
        trainer_args.update(enable_progress_bar=False, enable_model_summary=False)
    plugins = _trainer_plugins(trainer_args)
    logger = trainer_args.pop("logger", None)
    if logger is None or logger is True:
        logger = C.RunCSVLogger(path, keep_until_step=ckpt.get("global_step") if ckpt else None)
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
    try:
        with announce:
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
    except NonFiniteLossError as exc:
        error: RunError = RunError(
            f"{exc}. Last good checkpoint: {_last_good(ckpt_cb)}. Lower optimizer.lr (or clip gradients with "
            f"trainer.gradient_clip_val) and start a new run, or set run.on_nan=skip to leave such batches out.")
        error.quiet = rank != 0  # type: ignore[attr-defined]  # every rank stops alike; rank 0 reports
        raise error from None
    except SIGTERMException:
        how = (f"saved {ckpt_cb.last_path} at global step {trainer.global_step}" if ckpt_cb.saved_on_sigterm else
               f"the newest checkpoint is {_last_good(ckpt_cb)}; resuming repeats the steps after it")
        error = RunInterrupted(f"stopped by SIGTERM at global step {trainer.global_step} (epoch {trainer.current_epoch}); "
                               f"{how}. Continue with `regfw fit {cfg.source or 'CONFIG'} --run-dir {path} --resume`.")
        error.quiet = rank != 0  # type: ignore[attr-defined]
        raise error from None
    last = Path(ckpt_cb.last_model_path) if ckpt_cb.last_model_path else None
    if last is None and ckpt_cb.last_path.is_file():
        last = ckpt_cb.last_path  # written by spawned processes (ddp_spawn), whose callbacks stay there
    if rank != 0 or not trainer.is_global_zero:
        return FitResult(path, config_path, last, module=module, resumed_from=ckpt_path, rank=rank)
    metrics = {}
    train_loader = getattr(datamodule, "train_eval_dataloader", datamodule.train_dataloader)()
    for split, loader in (("train", train_loader), ("val", datamodule.val_dataloader())):
        for name, value in evaluate(module, loader).items():
            metrics[f"{split}_{name}"] = value
    plots: dict[str, str] = {}
    if mc is not None:
        metrics.update({f"mc_{k.replace('mc/', '')}": v for k, v in mc.last_metrics.items() if k.startswith("mc/")})
        metrics.update({k.replace("/", "_"): v for k, v in mc.last_metrics.items() if not k.startswith("mc/")})
        plots = dict(mc.flush_plots())
    return FitResult(path, config_path, last, metrics, plots=plots, module=module, resumed_from=ckpt_path)
