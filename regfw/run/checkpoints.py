"""Checkpoints that are never half-written, checked before they are trusted, and found for resume.

* :class:`AtomicCheckpointIO` writes every checkpoint to a temporary file in the same
  directory, flushes it to disk and renames it over the old one (``os.replace``): a crash or a
  ``kill -9`` mid-write leaves the previous checkpoint intact. (Lightning's default writes
  through a temporary file in the system temp directory and *moves* it, which across file
  systems is a copy into the final path.) It also records a SHA-256 digest of the whole content
  (:func:`seal`: tensors, hyperparameters, loop state, callback states, regfw's metadata), so a
  file damaged or edited later (a bad disk, a partial copy, a changed dropout rate) is reported
  instead of loaded: ``torch.load`` itself notices a truncated file but not changed bytes inside one.
* :func:`read_checkpoint` loads a checkpoint for resuming and turns every way it can be bad
  (missing, empty, truncated, corrupt, not a torch file, not written by regfw) into a
  :class:`~regfw.errors.RunError` naming the file, what is wrong and what to do;
  :func:`verify_checkpoint` refuses a regfw checkpoint without a matching digest or from another
  regfw version unless it is accepted knowingly (:mod:`regfw.run.checkpoint_trust`).
* :func:`regfw.run.checkpoint_compat.check_compatible` compares a checkpoint with the module built
  from the config and lists every difference by its config key.
* :class:`RunCheckpoint` is the ``ModelCheckpoint`` of ``regfw fit``: epoch checkpoints plus
  ``last.ckpt`` every ``run.checkpoint_every_n_steps`` steps and when SIGTERM arrives; an epoch's
  checkpoint carries the epoch's training row, which Lightning logs only after it.
* :class:`RunCSVLogger` continues ``metrics.csv`` of a resumed run instead of deleting it.
"""
from __future__ import annotations

import hashlib
import pathlib
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment

from regfw import __version__
from regfw.errors import RunError, short_repr
from regfw.run.atomic import atomic_open
from regfw.run.checkpoint_trust import current, how_to_accept, notice

PathLike = str | Path

#: Top-level checkpoint key holding the tensor digest written by :class:`AtomicCheckpointIO`.
INTEGRITY_KEY = "regfw_integrity"
LAST = "last.ckpt"


# -- writing ------------------------------------------------------------------------------------


def save_atomic(obj: Any, path: PathLike) -> None:
    """``torch.save(obj)`` to ``path`` through a temporary file in the same directory and a rename.

    Readers see the old file or the complete new one, never a partial file; the temporary file
    is removed if saving fails.
    """
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


#: Version of the digest format: 2 covers every top-level entry it lists (tensors, hyperparameters,
#: loop state, metadata); 1 (older checkpoints) covered the tensors only.
DIGEST_SCHEME = 2
#: Entries regfw reads when it resumes or samples: a checkpoint whose digest does not cover one of
#: these (that it holds) is unverified.
MUST_COVER = ("state_dict", "hyper_parameters", "loops", "epoch", "global_step", "optimizer_states",
              "lr_schedulers", "callbacks", "regfw", "regfw_epoch_means")


def _feed(h: Any, obj: Any, path: str, counter: list[int]) -> None:
    """Add ``obj`` to the hash ``h`` in a canonical form: the same for a value and its
    ``torch.save``/``torch.load`` round trip (mappings by sorted key, lists and tuples alike,
    floats by their exact repr, tensors by dtype, shape and bytes)."""
    if isinstance(obj, torch.Tensor):
        if obj.is_sparse or obj.is_quantized or obj.device.type == "meta":
            h.update(f"T{path}|{obj.dtype}|{tuple(obj.shape)}|opaque;".encode())
            return
        t = obj.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"T{path}|{t.dtype}|{tuple(obj.shape)}|".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes())
        h.update(b";")
        counter[0] += 1
    elif isinstance(obj, Mapping):
        h.update(b"{")
        for key in sorted(obj, key=lambda k: (type(k).__name__, repr(k))):
            if key == INTEGRITY_KEY and not path:
                continue
            h.update(f"{type(key).__name__}:{key!r}=".encode())
            _feed(h, obj[key], f"{path}/{key}", counter)
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(f"[{len(obj)}".encode())
        for i, value in enumerate(obj):
            _feed(h, value, f"{path}/{i}", counter)
        h.update(b"]")
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def content_digest(ckpt: Mapping[str, Any], keys: Any = None) -> tuple[str, int]:
    """SHA-256 over the top-level entries ``keys`` of ``ckpt`` (all but the digest itself when
    None): every tensor (key path, dtype, shape, bytes) and every other value (hyperparameters,
    loop state, metadata), and the number of tensors."""
    names = [k for k in ckpt if k != INTEGRITY_KEY] if keys is None else [k for k in keys if k in ckpt]
    h = hashlib.sha256()
    counter = [0]
    _feed(h, {k: ckpt[k] for k in names}, "", counter)
    return h.hexdigest(), counter[0]


def seal(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Record in ``checkpoint`` (in place, and return it) the digest of all its other entries.

    The digest covers everything that decides what is resumed or sampled: the weights, the
    optimizer and scheduler state, the hyperparameters (dropout rates, model and regularizer
    settings), the loop state (epoch, global step, progress), the callbacks' state and regfw's
    metadata (version, rates, plugins). It is written by :class:`AtomicCheckpointIO` and, for
    checkpoints written by another checkpoint IO, by the ``on_save_checkpoint`` hooks of
    :class:`~regfw.train.module.RegularizedModule` and :class:`~regfw.train.regularize.Regularize`
    (over what the checkpoint holds then); :func:`verify_checkpoint` checks it.
    """
    keys = sorted((k for k in checkpoint if k != INTEGRITY_KEY), key=str)
    digest, count = content_digest(checkpoint, keys)
    checkpoint[INTEGRITY_KEY] = {"scheme": DIGEST_SCHEME, "sha256": digest, "tensors": count, "covers": keys}
    return checkpoint


def seal_in_hook(checkpoint: dict[str, Any], trainer: Any) -> None:
    """:func:`seal` from an ``on_save_checkpoint`` hook, unless ``trainer`` writes through
    :class:`AtomicCheckpointIO`, which seals the whole file anyway (the content is hashed once)."""
    io = getattr(getattr(trainer, "strategy", None), "checkpoint_io", None) if trainer is not None else None
    if not isinstance(io, AtomicCheckpointIO):
        seal(checkpoint)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes atomically (:func:`save_atomic`) with the digest of
    :func:`seal` over the whole checkpoint.

    Pass it as ``Trainer(plugins=[AtomicCheckpointIO()])``; ``regfw fit`` always does.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: PathLike, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        save_atomic(seal({k: v for k, v in checkpoint.items() if k != INTEGRITY_KEY}), path)


# -- reading and checking ---------------------------------------------------------------------


def _others(path: Path) -> str:
    siblings = sorted(p.name for p in path.parent.glob("*.ckpt") if p.name != path.name) if path.parent.is_dir() else []
    if siblings:
        return f" Other checkpoints there: {', '.join(siblings)}; resume from one with `--resume PATH`, or"
    return " Resume from another checkpoint with `--resume PATH`, or"


def unreadable(path: Path, exc: BaseException) -> str:
    """Why ``torch.load`` could not read ``path``, by what the file is: a zip archive or a pickle
    (torch's two formats) that fails is damaged or truncated; anything else is not a torch file;
    a file that unpickles only by importing code holds Python objects other than tensors. (torch
    puts its ``weights_only`` explanation into every unpickling error, so its text says nothing.)"""
    with open(path, "rb") as f:
        head = f.read(4)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    if isinstance(exc, pickle.UnpicklingError) and found:
        return (f"holds Python objects other than tensors and plain data ({found.group(1)}); regfw loads "
                f"checkpoints with torch.load(weights_only=True) and does not run code from a file")
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "is corrupt or truncated"  # a torch file that cannot be read to its end
    return f"is not a torch checkpoint (it starts with {head!r}, neither a zip archive nor a pickle)"


def read_checkpoint(path: PathLike, *, verify: bool = True, accept_unverified: bool | None = None,
                    accept_version: bool | None = None) -> dict:
    """Load the checkpoint at ``path`` onto the CPU, or raise a :class:`RunError` saying why not.

    Checks that the file exists and is not empty, that ``torch.load`` can read it (a truncated
    file cannot be), that it is a Lightning checkpoint written by regfw, and (``verify``)
    :func:`verify_checkpoint` (its digest and regfw version; ``accept_*`` None: as the command's
    flags say, :mod:`regfw.run.checkpoint_trust`) and that its weights are finite.
    """
    path = Path(path)
    start_over = " start a new run without --resume."
    if not path.exists():
        raise RunError(f"checkpoint {str(path)!r} does not exist.{_others(path)}{start_over}")
    if not path.is_file():
        raise RunError(f"checkpoint {str(path)!r} is not a file; pass the .ckpt file itself.")
    if path.stat().st_size == 0:
        raise RunError(f"checkpoint {str(path)!r} is empty (0 bytes): it was never completely written."
                       f"{_others(path)}{start_over}")
    try:
        ckpt = safe_load(path)
    except Exception as exc:  # noqa: BLE001 - every reason a file cannot be read is reported by what the file is
        what = unreadable(path, exc)
        if what.startswith("holds"):
            raise RunError(f"checkpoint {str(path)!r} {what}. Use a checkpoint written by `regfw fit`.") from None
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        noise = "weights_only" in reason or "Weights only" in reason  # torch's explanation, not the reason
        detail = "" if noise else f" ({type(exc).__name__}: {reason[:160]})"
        raise RunError(f"checkpoint {str(path)!r} {what} and cannot be read{detail}."
                       f"{_others(path)}{start_over}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise RunError(f"checkpoint {str(path)!r} is not a Lightning checkpoint (it holds "
                       f"{type(ckpt).__name__}{' without a state_dict' if isinstance(ckpt, dict) else ''}); "
                       f"resume needs a .ckpt file written by `regfw fit`.")
    if "regfw" not in ckpt or "hyper_parameters" not in ckpt:
        raise RunError(f"checkpoint {str(path)!r} was not written by regfw (it has no 'regfw' metadata or "
                       f"hyperparameters); resume needs a checkpoint written by `regfw fit`.")
    if verify:
        verify_checkpoint(ckpt, path, accept_unverified=accept_unverified, accept_version=accept_version)
        check_finite_weights(ckpt, path)
    regs = (ckpt.get("hyper_parameters") or {}).get("regularizers")
    if regs is not None and not isinstance(regs, Mapping):
        raise RunError(f"checkpoint {str(path)!r} is damaged: its 'regularizers' hyperparameter is "
                       f"{type(regs).__name__} {short_repr(regs)}, expected a mapping of regularizer names to "
                       f"settings. Resume from a checkpoint written by `regfw fit`.")
    return ckpt


def is_regfw_checkpoint(ckpt: Any) -> bool:
    """Whether ``ckpt`` was written by regfw: its ``regfw`` metadata (with the version), which
    every regfw checkpoint has, digest or not."""
    return isinstance(ckpt, Mapping) and isinstance(ckpt.get("regfw"), Mapping) and "version" in ckpt["regfw"]


def digest_problem(ckpt: Mapping[str, Any]) -> str | None:
    """Why ``ckpt``'s digest does not vouch for it (None: every entry regfw reads is covered and unchanged)."""
    integrity = ckpt.get(INTEGRITY_KEY)
    if not isinstance(integrity, Mapping) or "sha256" not in integrity:
        return "has no integrity digest (the digest was removed, or another program wrote the file)"
    covers = integrity.get("covers")
    if integrity.get("scheme") != DIGEST_SCHEME or not isinstance(covers, list):
        return ("has a digest of an older format that covers only its tensors, not its hyperparameters and loop "
                "state")
    uncovered = [k for k in MUST_COVER if k in ckpt and k not in covers]
    if uncovered:
        return f"holds {', '.join(uncovered)} that its digest does not cover (added after it was written)"
    digest, _ = content_digest(ckpt, covers)
    if digest != integrity["sha256"]:
        return ("no longer matches the SHA-256 digest recorded when it was written (its weights, hyperparameters "
                "or loop state were edited, or the file is damaged)")
    return None


def verify_checkpoint(ckpt: Mapping[str, Any], path: PathLike, *, accept_unverified: bool | None = None,
                      accept_version: bool | None = None) -> None:
    """A :class:`RunError` unless the regfw checkpoint ``ckpt`` is verified whole and of this regfw version.

    Refused: a digest that is missing, of the older tensors-only format, or that no longer matches
    the content (:func:`seal` says what it covers), and a checkpoint written by another regfw
    version. ``accept_unverified`` / ``accept_version`` (None: :func:`regfw.run.checkpoint_trust.current`,
    which the CLI's ``--accept-unverified`` / ``--accept-version`` set) accept them knowingly,
    with one notice line each on stderr. A checkpoint without regfw's metadata is not regfw's and
    is left to the caller.
    """
    if not is_regfw_checkpoint(ckpt):
        return
    accepted = current()
    unverified_ok = accepted.unverified if accept_unverified is None else accept_unverified
    version_ok = accepted.version if accept_version is None else accept_version
    name = str(path)
    problem = digest_problem(ckpt)
    if problem is not None:
        if not unverified_ok:
            raise RunError(f"checkpoint {name!r} {problem}: it is not loaded unverified. Use a checkpoint written by "
                           f"`regfw fit`, or, if you trust this file, {how_to_accept('unverified')}.")
        notice(f"checkpoint {name!r} {problem}; loaded unverified, as accepted.")
    written_by = ckpt["regfw"].get("version")
    if written_by != __version__:
        if not version_ok:
            raise RunError(f"checkpoint {name!r} was written by regfw {written_by}, this is regfw {__version__}: "
                           f"its regularizers may build or sample differently. Use it with regfw {written_by}, or, "
                           f"to load it with this version, {how_to_accept('version')}.")
        notice(f"checkpoint {name!r} was written by regfw {written_by}; loaded with regfw {__version__}, as accepted.")


#: Types other than tensors and plain data that a regfw checkpoint may hold; ``torch.load`` with
#: ``weights_only=True`` refuses every other global, so a file cannot run code when it is read.
SAFE_TYPES: list[Any] = [pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath]


def safe_load(path: PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU, with :data:`SAFE_TYPES` allowed."""
    with torch.serialization.safe_globals(SAFE_TYPES):
        return torch.load(path, map_location="cpu", weights_only=True)


def check_finite_weights(ckpt: Mapping[str, Any], path: PathLike) -> None:
    """A :class:`RunError` when a floating-point weight of ``ckpt`` is NaN or infinite.

    Such weights make every prediction NaN; resuming or ranking from them would only spread it.
    Checked with or without the tensor digest, which proves only that the file is unchanged.
    """
    bad = [k for k, t in (ckpt.get("state_dict") or {}).items()
           if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise RunError(f"checkpoint {str(path)!r} holds non-finite weights (NaN or inf) in {', '.join(bad[:3])}"
                       f"{more}; the run diverged before it was written.{_others(Path(path))} start a new run "
                       f"(lower optimizer.lr or set trainer.gradient_clip_val).")


def epochs_done(ckpt: Mapping[str, Any]) -> int:
    """How many epochs the checkpoint's loop state has finished (a checkpoint written after the
    last batch of an epoch counts that epoch as finished, as Lightning does when it resumes)."""
    loop = ((ckpt.get("loops") or {}).get("fit_loop") or {})
    batches = loop.get("epoch_loop.batch_progress") or {}
    epoch = int(ckpt.get("epoch") or 0)
    return epoch + 1 if batches.get("is_last_batch") else epoch


def check_loop_state(ckpt: Mapping[str, Any], path: PathLike, trainer: Mapping[str, Any]) -> None:
    """A :class:`RunError` unless ``ckpt``'s loop state is whole and leaves training to do.

    Lightning trusts ``epoch``, ``global_step`` and ``loops`` blindly: an edited or missing loop
    state, or a checkpoint that already reached ``trainer.max_epochs``, would train nothing and
    exit 0 with the old metrics.
    """
    name = str(path)
    epoch, step = ckpt.get("epoch"), ckpt.get("global_step")
    loop = (ckpt.get("loops") or {}).get("fit_loop") if isinstance(ckpt.get("loops"), Mapping) else None
    if not isinstance(loop, Mapping) or "epoch_progress" not in loop:
        raise RunError(f"checkpoint {name!r} has no training loop state (loops.fit_loop); it holds weights only "
                       f"and cannot be resumed. Start a new run without --resume.")
    for key, value in (("epoch", epoch), ("global_step", step)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise RunError(f"checkpoint {name!r}: its {key} is {value!r}, expected a whole number >= 0; the file "
                           f"was edited or damaged. Resume from another checkpoint or start a new run.")
    epoch, step = int(epoch), int(step)  # type: ignore[arg-type]  # checked just above
    progress = (loop.get("epoch_progress") or {}).get("current") or {}
    batches = (loop.get("epoch_loop.batch_progress") or {}).get("total") or {}
    if progress.get("processed", epoch) not in (epoch, epoch + 1) or batches.get("ready", step) < step:
        raise RunError(f"checkpoint {name!r}: its epoch ({epoch}) and global step ({step}) disagree with its loop "
                       f"state (epoch {progress.get('processed')}, {batches.get('ready')} batches); the file "
                       f"was edited or damaged. Resume from another checkpoint or start a new run.")
    done = epochs_done(ckpt)
    max_epochs = trainer.get("max_epochs")
    if isinstance(max_epochs, int) and max_epochs >= 0 and done >= max_epochs:
        epochs = f"{done} epoch{'' if done == 1 else 's'}"
        raise RunError(f"checkpoint {name!r} has finished {epochs} (global step {step}), and "
                       f"trainer.max_epochs is {max_epochs}: there is nothing left to train. To train longer, "
                       f"resume with trainer.max_epochs={done + 1} or more.")
    max_steps = trainer.get("max_steps")
    if isinstance(max_steps, int) and max_steps >= 0 and step >= max_steps:
        raise RunError(f"checkpoint {name!r} is at global step {step}, and trainer.max_steps is {max_steps}: "
                       f"there is nothing left to train. To train longer, resume with trainer.max_steps="
                       f"{step + 1} or more.")


# -- finding what to resume -----------------------------------------------------------------------


def run_stem(cfg: Any) -> str:
    """The name part of ``cfg``'s run directories: ``run.name`` or the config file's stem."""
    return cfg.run.name or (Path(cfg.source).stem if cfg.source else "run")


def latest_run_dir(cfg: Any) -> Path:
    """The newest ``<run.dir>/<stem>-<timestamp>[-n]`` directory of ``cfg`` that can be resumed (it
    has ``checkpoints/last.ckpt``; a run killed before its first checkpoint is passed over), else
    the newest one, or a :class:`RunError` when there is none."""
    root = Path(cfg.run.dir)
    stem = run_stem(cfg)
    pattern = re.compile(rf"^{re.escape(stem)}-(\d{{8}}-\d{{6}})(?:-(\d+))?$")
    found = []
    if root.is_dir():
        for child in root.iterdir():
            m = pattern.match(child.name)
            if m and child.is_dir():
                found.append(((m.group(1), int(m.group(2) or 1)), child))
    if not found:
        raise RunError(f"--resume: no run of {stem!r} under {str(root)!r} (looked for {stem}-YYYYmmdd-HHMMSS); "
                       f"pass the checkpoint (`--resume PATH`) or the run (`--run-dir DIR --resume`).")
    resumable = [item for item in found if (item[1] / "checkpoints" / LAST).is_file()]
    if not resumable:  # the newest one is named in the error of resume_target
        return max(found)[1]
    return max(resumable)[1]


def resume_target(cfg: Any, checkpoint: PathLike | None, run_dir: PathLike | None) -> tuple[Path, Path | None]:
    """``(checkpoint to resume from, run directory to continue in or None for a new one)``.

    * no checkpoint: ``<run_dir or the newest run of the config>/checkpoints/last.ckpt``, and
      training continues in that run directory;
    * a checkpoint inside a run directory (``<run>/checkpoints/*.ckpt``, or ``<run>/*.ckpt`` such
      as Lightning's SLURM ``hpc_ckpt_N.ckpt``, with ``<run>/config.yaml``): training continues
      in that run directory;
    * any other checkpoint: training continues from it in a new run directory.
    """
    if checkpoint:
        path = Path(checkpoint)
        owner = next((d for d in (path.parent, path.parent.parent) if (d / "config.yaml").is_file()), None)
        if run_dir and owner is not None and Path(run_dir).resolve() != owner.resolve():
            raise RunError(f"--resume {str(path)!r} belongs to run {str(owner)!r}, not to --run-dir {str(run_dir)!r}; "
                           f"pass one of them.")
        return path, owner
    directory = Path(run_dir) if run_dir else latest_run_dir(cfg)
    path = directory / "checkpoints" / LAST
    if not path.is_file():
        raise RunError(f"--resume: run {str(directory)!r} has no checkpoints/{LAST} (it stopped before its first "
                       f"checkpoint, or it is not a regfw run); pass a checkpoint with `--resume PATH`, or start a "
                       f"new run without --resume.")
    return path, directory


# -- the run's checkpoint callback and logger --------------------------------------------------


class RunCheckpoint(ModelCheckpoint):
    """``regfw fit``'s checkpoints: ``epoch=NNN.ckpt`` at epoch ends (the latest one kept) and
    ``last.ckpt``, which is rewritten at every epoch end, every ``every_n_steps`` training steps
    (0: only at epoch ends) and at the step where a SIGTERM arrived.

    On SIGTERM (a scheduler preempting the job, ``kill``), Lightning stops after the current
    batch without saving; this callback saves ``last.ckpt`` at that batch first, so a resumed
    run repeats nothing (a SIGTERM during validation, or at an epoch's last batch, waits for the
    validation's or epoch's checkpoint instead). Under DDP the ranks agree on the signal before saving (all of them must
    take part in a save).
    """

    #: A SIGTERM during validation waits for the validation's checkpoint (regfw.run.stopping.EvaluationStop).
    defers_sigterm = True

    def __init__(self, dirpath: PathLike, every_n_steps: int = 0) -> None:
        # no version counter: a resumed (or moved) run rewrites its own last.ckpt, never last-v1.ckpt
        super().__init__(dirpath=str(dirpath), filename="epoch={epoch:03d}", save_last=True,
                         auto_insert_metric_name=False, enable_version_counter=False)
        self.every_n_steps = int(every_n_steps)
        #: Global step and path of the newest last.ckpt this run wrote (None: none yet).
        self.last_saved_step: int | None = None
        self.saved_on_sigterm = False
        self._deferred_sigterm = False
        self._pending_sums: dict[str, Any] = {}
        self._pending_epoch = -1
        self._trainer_ref: pl.Trainer | None = None
        self._resume_row: dict[str, Any] | None = None
        #: Called after every checkpoint this callback writes (``regfw fit`` keeps the run from then on).
        self.on_save: Callable[[], None] | None = None

    @property
    def last_path(self) -> Path:
        assert self.dirpath is not None, "RunCheckpoint is always made with a directory"
        return Path(self.dirpath) / LAST

    def _sigterm(self, trainer: pl.Trainer) -> bool:
        received = bool(getattr(trainer, "received_sigterm", False))
        if trainer.world_size > 1:
            received = trainer.strategy.reduce_boolean_decision(received, all=False)
        return received

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._pending_sums:
            self._restore_sums(trainer)
        step = trainer.global_step
        due = self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0
        sigterm = self._sigterm(trainer)
        if _last_batch_of_epoch(trainer, batch_idx):
            # A checkpoint here would resume in the next epoch, skipping this one's validation, epoch
            # checkpoint and metrics rows (Lightning's loop state cannot express "after the last batch").
            # The epoch-end checkpoint follows shortly; a SIGTERM waits for it.
            if sigterm:
                self._deferred_sigterm = True
                trainer._signal_connector.received_sigterm = False
            return
        if (due or sigterm) and self.last_saved_step != step:
            _flush_loggers(trainer)
            trainer.save_checkpoint(str(self.last_path), self.save_weights_only)
            self.last_model_path = str(self.last_path)
            self.last_saved_step = step
            if self.on_save is not None:
                self.on_save()
        if sigterm:
            self.saved_on_sigterm = True

    # -- the epoch's running metrics --------------------------------------------------------------
    # Lightning does not checkpoint the sums behind epoch-level metrics (``train_loss`` with
    # ``on_epoch=True``): a run resumed mid-epoch would log that epoch's mean over the batches
    # after the resume only. They travel in this callback's state and are added back after the
    # first batch, in the order the uninterrupted run adds them (so the mean is bitwise the same).

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        trainer = getattr(self, "_trainer_ref", None)
        sums = {}
        if trainer is not None:
            for key, metric in trainer.fit_loop.epoch_loop._results.items():
                if getattr(metric, "is_tensor", False) and metric.meta.on_epoch:
                    sums[key] = {"value": metric.value.detach().clone(),
                                 "count": getattr(metric, "cumulated_batch_size", torch.tensor(0)).clone()}
        state["epoch_sums"] = sums
        state["epoch_sums_epoch"] = trainer.current_epoch if trainer is not None else -1
        state["epoch_row"] = _pending_epoch_row(trainer) if trainer is not None else None
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._pending_sums = dict(state_dict.get("epoch_sums") or {})
        self._pending_epoch = state_dict.get("epoch_sums_epoch", -1)
        self._resume_row = state_dict.get("epoch_row")

    # -- the epoch's training row ---------------------------------------------------------------
    # Lightning logs an epoch's training metrics (train_loss, train_acc) after the epoch's checkpoint
    # (at validation end) is written, and a run resumed from that checkpoint starts the next epoch:
    # a kill between the two would lose the row. The row travels in the checkpoint (``epoch_row``)
    # and the resumed run writes it to metrics.csv when it is not there.

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        row, self._resume_row = self._resume_row, None
        if not row or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger) and not _has_row(Path(logger.experiment.metrics_file_path), row):
                logger.log_metrics(dict(row["metrics"]), step=int(row["step"]))
                logger.save()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._trainer_ref = trainer

    def _restore_sums(self, trainer: pl.Trainer) -> None:
        pending, self._pending_sums = self._pending_sums, {}
        if trainer.current_epoch != self._pending_epoch:
            return  # saved at an epoch's end: the resumed run starts the next epoch afresh
        for key, metric in trainer.fit_loop.epoch_loop._results.items():
            saved = pending.get(key)
            if saved is None or not getattr(metric, "is_tensor", False):
                continue
            meta = metric.meta
            if meta.is_mean_reduction:
                metric.value = saved["value"].to(metric.value) + metric.value
                count = metric.cumulated_batch_size
                metric.cumulated_batch_size = saved["count"].to(count) + count
            elif meta.is_sum_reduction:
                metric.value = saved["value"].to(metric.value) + metric.value
            elif meta.is_max_reduction or meta.is_min_reduction:
                metric.value = meta.reduce_fx(saved["value"].to(metric.value), metric.value)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._release_sigterm(trainer)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        # Lightning would stop after this batch, before the validation's checkpoint: every training
        # step since the last checkpoint would be lost. A SIGTERM waits for the validation to end.
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        if trainer.state.fn == "fit" and not trainer.sanity_checking and self._sigterm(trainer):
            self._deferred_sigterm = True
            trainer._signal_connector.received_sigterm = False

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)  # the validation's checkpoint
        self._release_sigterm(trainer)

    def _release_sigterm(self, trainer: pl.Trainer) -> None:
        if self._deferred_sigterm:  # the checkpoint it waited for is written: now Lightning may stop
            self._deferred_sigterm = False
            self.saved_on_sigterm = True
            trainer._signal_connector.received_sigterm = True

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        _flush_loggers(trainer)  # metrics.csv holds every row up to the checkpoint when the checkpoint exists
        super()._save_checkpoint(trainer, filepath)
        if Path(filepath).name == LAST:
            self.last_saved_step = trainer.global_step
        if self.on_save is not None:
            self.on_save()


def _pending_epoch_row(trainer: pl.Trainer) -> dict[str, Any] | None:
    """The training row Lightning is about to log for the epoch whose batches are all done (the
    metrics and step of its ``update_train_epoch_metrics``), or None when there is none pending."""
    from lightning_fabric.utilities.apply_func import convert_tensors_to_scalars

    loop = trainer.fit_loop.epoch_loop
    if not loop.batch_progress.is_last_batch or loop._results is None:
        return None
    metrics = convert_tensors_to_scalars(dict(loop._results.metrics(False)["log"]))
    if not metrics:
        return None  # logged already (the results are reset after logging)
    step = metrics.pop("step", None)
    if step is None:
        metrics.setdefault("epoch", trainer.current_epoch)
        step = loop._batches_that_stepped - 1  # the step Lightning logs epoch-end metrics at
    return {"metrics": metrics, "step": int(step)}


def _has_row(path: Path, row: Mapping[str, Any]) -> bool:
    """Whether the metrics file at ``path`` has a row at ``row``'s step with all of its metrics."""
    import csv

    if not path.is_file():
        return False
    with open(path, newline="") as f:
        for found in csv.DictReader(f):
            if found.get("step") == str(row["step"]) and all(found.get(k) not in (None, "") for k in row["metrics"]):
                return True
    return False


def _last_batch_of_epoch(trainer: pl.Trainer, batch_idx: int) -> bool:
    total = trainer.num_training_batches
    return bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch) or (
        isinstance(total, int) and batch_idx + 1 >= total)


def _flush_loggers(trainer: pl.Trainer) -> None:
    for logger in trainer.loggers:
        logger.save()


class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is continued, not deleted.

    Rows logged after ``keep_until_step`` (work that a resumed run is about to redo) are
    dropped, so the file has one row per step.
    """

    keep_until_step: int | None = None

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        import csv
        import io

        text = path.read_text()
        partial = bool(text) and not text.endswith("\n")  # a kill in the middle of appending a row
        if partial:
            text = text[: text.rfind("\n") + 1]
        reader = csv.DictReader(io.StringIO(text, newline=""))
        fields = list(reader.fieldnames or [])
        rows = list(reader)
        self.metrics_keys = sorted(fields)
        limit = self.keep_until_step
        if limit is not None or partial:
            # a row logged at step s belongs to the (s+1)-th batch: those of a checkpoint at global step g are < g
            kept = [r for r in rows if limit is None or not (r.get("step") or "").isdigit() or int(r["step"]) < limit]
            if len(kept) != len(rows) or partial:
                with atomic_open(path, "w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
                    writer.writeheader()
                    writer.writerows(kept)


class RunCSVLogger(CSVLogger):
    """``metrics.csv`` and ``hparams.yaml`` directly in the run directory, continued on resume."""

    def __init__(self, run_dir: PathLike, keep_until_step: int | None = None) -> None:
        # every row reaches the file when it is logged: a kill loses none of the steps before it
        super().__init__(save_dir=str(run_dir), name="", version="", flush_logs_every_n_steps=1)
        self._keep_until_step = keep_until_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            writer_cls = type("_Writer", (_ContinuingWriter,), {"keep_until_step": self._keep_until_step})
            self._experiment = writer_cls(log_dir=self.log_dir)
        return cast(ExperimentWriter, self._experiment)
