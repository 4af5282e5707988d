"""The same config on several processes, and training that resumes exactly where it stopped.

Three things make a run reproducible across interruptions and across ranks:

* **Per-step seeds** (:class:`StepSeeding`). Lightning's ``seed_everything`` gives every rank
  the same seed, so under DDP every rank would draw the same dropout masks for its shard of the
  global batch: the noise is correlated across the batch instead of independent. The callback
  reseeds the global random streams at the start of every training batch from
  ``(seed, global rank, epoch, batch index)``: ranks draw different masks, and a run resumed
  from a mid-epoch checkpoint draws exactly the masks the uninterrupted run drew, without any
  random-generator state in the checkpoint. The model is built before any of this, from
  ``seed`` alone, so every rank starts from the same weights.
* **An epoch-determined, resumable data order** (:func:`make_resumable`). The shuffled order
  of epoch ``e`` is a function of ``(seed, e)`` (as :class:`~torch.utils.data.DistributedSampler`
  makes it under DDP), and the loader keeps how many batches of the epoch it has handed out in
  the checkpoint (Lightning's ``state_dict`` / ``load_state_dict`` protocol for data loaders),
  so a resumed run skips exactly the batches already trained on, without loading them.
* **One run directory for all ranks** (see :func:`regfw.run.job.fit`): processes started by
  Lightning's own launcher receive rank 0's directory through :data:`RUN_DIR_ENV`; processes
  started by ``torchrun`` or SLURM must be given one with ``--run-dir`` (or the variable).

"Exactly" means bitwise on the same hardware, software and number of threads: CPU kernels sum
in an order that depends on the thread count (``OMP_NUM_THREADS``), so a run resumed with
another one ends within float rounding of, not bitwise equal to, the uninterrupted run.
"""
from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, RandomSampler, Sampler, SequentialSampler

#: The run directory shared with processes started by Lightning's launcher (and an alternative
#: to ``--run-dir`` for jobs started by ``torchrun`` or SLURM).
RUN_DIR_ENV = "REGFW_RUN_DIR"
#: The checkpoint rank 0 resumes from, passed to the processes Lightning's launcher starts.
RESUME_ENV = "REGFW_RESUME_FROM"

_RANK_VARS = ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def env_rank() -> int:
    """This process's global rank as the launcher announced it, before ``torch.distributed`` is up.

    ``torchrun`` sets ``RANK``, SLURM ``SLURM_PROCID``; Lightning's launcher sets ``LOCAL_RANK``
    (and ``NODE_RANK``) for the processes it starts. A plain process is rank 0.
    """
    for var in _RANK_VARS:
        if os.environ.get(var, "").strip().isdigit():
            return int(os.environ[var])
    local = os.environ.get("LOCAL_RANK", "").strip()
    if local.isdigit():
        node = os.environ.get("NODE_RANK", "0").strip()
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
        return int(local) + (int(node) * per_node if node.isdigit() else 0)
    return 0


def _int_env(name: str) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() else 0


def launched_externally() -> bool:
    """Whether a launcher outside this program (``torchrun``, SLURM ``srun``, ``mpirun``) started
    several processes, each running this command from the start."""
    return max(_int_env("WORLD_SIZE"), _int_env("SLURM_NTASKS"), _int_env("OMPI_COMM_WORLD_SIZE")) > 1


def shared_run_dir() -> str | None:
    """The run directory announced to this process through :data:`RUN_DIR_ENV`, if any."""
    value = os.environ.get(RUN_DIR_ENV, "").strip()
    return value or None


@contextmanager
def announce_to_child_processes(run_dir: str, checkpoint: str | None) -> Iterator[None]:
    """Set :data:`RUN_DIR_ENV` (and :data:`RESUME_ENV`) while Lightning starts the other ranks.

    Lightning's subprocess launcher runs this very command line again for ranks 1.., with a
    copy of this process's environment; without the variables each would make a run directory
    of its own, or pick a different checkpoint. They are removed again afterwards so that a
    later ``fit`` in the same Python process starts afresh.
    """
    saved = {k: os.environ.get(k) for k in (RUN_DIR_ENV, RESUME_ENV)}
    os.environ[RUN_DIR_ENV] = str(run_dir)
    if checkpoint:
        os.environ[RESUME_ENV] = str(checkpoint)
    else:
        os.environ.pop(RESUME_ENV, None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# -- per-step, per-rank seeds ------------------------------------------------------------------


def step_seed(seed: int, rank: int, epoch: int, batch_idx: int) -> int:
    """A 63-bit seed that depends on every argument (a hash, so neighbouring values do not collide)."""
    digest = hashlib.blake2b(f"regfw/{seed}/{rank}/{epoch}/{batch_idx}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def seed_all(value: int) -> None:
    """Seed torch (CPU and every initialised accelerator), NumPy and Python's ``random`` from one value.

    ``torch.manual_seed`` does the same but also visits every accelerator backend, initialised
    or not, which costs about 0.35 ms per call on a CPU machine: a third of a small model's
    training step. An accelerator that is not initialised has drawn nothing yet.
    """
    torch.default_generator.manual_seed(value)
    for backend in (torch.cuda, getattr(torch, "xpu", None)):
        if backend is not None and backend.is_initialized():
            backend.manual_seed_all(value)
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():  # pragma: no cover - Apple silicon
        torch.mps.manual_seed(value)
    random.seed(value)
    try:
        import numpy as np

        np.random.seed(value % 2**32)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass


class StepSeeding(pl.Callback):
    """Reseed the random streams before every training batch and every training epoch.

    The seed is :func:`step_seed` of ``(seed, trainer.global_rank, epoch, batch_idx)``
    (``batch_idx = -1`` at the start of an epoch), so:

    * every rank draws different dropout masks (Lightning's ``seed_everything`` alone gives all
      ranks the same stream, and thus the same masks for every rank's shard of the batch);
    * a run resumed from any checkpoint draws the same masks as an uninterrupted run, with no
      generator state in the checkpoint;
    * validation, the MC dropout callback and sanity checks, which run between batches, cannot
      shift the masks of the training steps that follow them.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    @property
    def state_key(self) -> str:
        return "StepSeeding"

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seed_all(step_seed(self.seed, trainer.global_rank, trainer.current_epoch, -1))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        seed_all(step_seed(self.seed, trainer.global_rank, trainer.current_epoch, batch_idx))

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.seed = int(state_dict.get("seed", self.seed))


# -- a data order that is a function of (seed, epoch), and resumable mid-epoch -----------------


class EpochShuffleSampler(RandomSampler):
    """A random permutation per epoch, drawn from ``(seed, epoch)`` alone.

    A ``RandomSampler`` with one generator continues that generator from epoch to epoch, so a
    fresh process cannot recreate epoch ``e``'s order without replaying epochs ``0..e-1``.
    Lightning calls :meth:`set_epoch` before every epoch (as for ``DistributedSampler``, which
    replaces this sampler under DDP: it is a ``RandomSampler``, so Lightning knows to shuffle).
    """

    def __init__(self, data_source: Any, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(step_seed(self.seed, -1, self.epoch, -1))
        yield from torch.randperm(len(self.data_source), generator=g).tolist()


class _SkipFirst:
    """An index sampler that leaves out its first ``skip`` batches the first time it is iterated."""

    def __init__(self, base: Any, skip: int) -> None:
        self.base = base
        self.skip = skip

    def __len__(self) -> int:
        return len(self.base)

    def __iter__(self) -> Iterator[Any]:
        skip, self.skip = self.skip, 0  # persistent workers iterate the same object every epoch
        for i, item in enumerate(self.base):
            if i >= skip:
                yield item


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that remembers how far into its epoch it is, for exact mid-epoch resume.

    ``state_dict()`` records the epoch (the sampler's ``epoch``) and how many batches of it were
    handed out; Lightning stores it in the checkpoint (``loops.fit_loop.state_dict.combined_loader``)
    and, on resume, passes it to ``load_state_dict()`` before it makes the first iterator. That
    iterator skips those batches by index, without loading them; later ones run in full. This
    works the same after Lightning replaced the sampler by a ``DistributedSampler`` under DDP.
    Lightning reads a sized loader without pre-fetching, so "handed out" means "trained on".
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._yielded = 0
        self._skip_now = 0
        self._pending: dict | None = None

    # DataLoader builds every iterator's stream of indices from this property.
    @property
    def _index_sampler(self) -> Any:
        return _SkipFirst(super()._index_sampler, self._skip_now)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return self._lazy_iter()

    def _lazy_iter(self) -> Iterator[Any]:
        # The DataLoader iterator is made at the first batch, not when Lightning calls iter():
        # Lightning calls iter() before it calls set_epoch at a resume, and an iterator with
        # workers draws its indices when it is made, which would give the previous epoch's order.
        self._skip_now = self._take_skip()
        inner = DataLoader.__iter__(self)
        self._yielded, self._skip_now = self._skip_now, 0
        for batch in inner:
            self._yielded += 1
            yield batch

    def _samplers(self) -> list:
        return [s for s in (self.sampler, getattr(self.batch_sampler, "sampler", None)) if s is not None]

    def _epoch(self) -> int | None:
        for sampler in self._samplers():
            epoch = getattr(sampler, "epoch", None)
            if isinstance(epoch, int):
                return epoch
        return None

    def _set_epoch(self, epoch: int) -> None:
        for sampler in self._samplers():
            if callable(getattr(sampler, "set_epoch", None)):
                sampler.set_epoch(epoch)

    def _take_skip(self) -> int:
        """Batches to leave out of the iterator made now: only the first one after a load."""
        pending, self._pending = self._pending, None
        if not pending:
            return 0
        epoch = self._epoch()
        if pending.get("epoch") is not None and epoch is not None and epoch != pending["epoch"]:
            return 0  # the saved epoch is over; this iterator serves another one
        return int(pending.get("batches", 0))

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch(), "batches": self._yielded, "length": len(self)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        batches, length = int(state_dict.get("batches", 0)), state_dict.get("length")
        epoch = state_dict.get("epoch")
        self._pending = None
        if length is not None and batches >= int(length):
            # the saved epoch was complete: the next iterator runs the following epoch in full
            if epoch is not None:
                self._set_epoch(int(epoch) + 1)
            return
        if epoch is not None:
            self._set_epoch(int(epoch))  # Lightning sets it again before the first batch
        self._pending = {"epoch": epoch, "batches": batches}


def resumable_loader(loader: Any, seed: int) -> Any:
    """``loader`` rebuilt as a :class:`ResumableDataLoader` with an epoch-determined order.

    Only plain ``DataLoader`` objects over a map-style dataset with the default random or
    sequential sampler are rebuilt; anything else (an ``IterableDataset``, a custom sampler or
    batch sampler, a ``DataLoader`` subclass) is returned unchanged, and Lightning warns if a
    mid-epoch checkpoint of it is resumed. The loader gets a generator of its own, so making an
    iterator never draws from the global random stream (which :class:`StepSeeding` owns).
    """
    from torch.utils.data import BatchSampler, IterableDataset

    if type(loader) is not DataLoader or isinstance(loader.dataset, IterableDataset):
        return loader
    if type(loader.batch_sampler) is not BatchSampler:
        return loader
    sampler = loader.sampler
    if type(sampler) is RandomSampler and not sampler.replacement and sampler._num_samples is None:
        new_sampler: Sampler = EpochShuffleSampler(loader.dataset, seed=seed)
    elif type(sampler) is SequentialSampler:
        new_sampler = sampler
    else:
        return loader
    kwargs = dict(
        batch_size=loader.batch_size, sampler=new_sampler, num_workers=loader.num_workers,
        collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
        timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=torch.Generator().manual_seed(step_seed(seed, -2, 0, 0)),
        persistent_workers=loader.persistent_workers, pin_memory_device=loader.pin_memory_device,
    )
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    return ResumableDataLoader(loader.dataset, **kwargs)


class _ResumableTrainLoader:
    """Stands in for ``datamodule.train_dataloader``: a class, not a closure, so that strategies
    that pickle the data module (``ddp_spawn``) can."""

    def __init__(self, original: Any, seed: int) -> None:
        self.original = original
        self.seed = seed

    def __call__(self) -> Any:
        return resumable_loader(self.original(), self.seed)


def make_resumable(datamodule: Any, seed: int) -> Any:
    """Make ``datamodule.train_dataloader()`` return :func:`resumable_loader` of its loader."""
    if not isinstance(datamodule.train_dataloader, _ResumableTrainLoader):
        datamodule.train_dataloader = _ResumableTrainLoader(datamodule.train_dataloader, seed)
    return datamodule
