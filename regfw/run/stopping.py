"""SIGTERM and SIGINT at any moment of ``regfw fit``: one line saying what happened and what state
the run is in, never a silent ``-15``, never a signal lost, never a half-made run directory.

Lightning handles the two signals only while it trains. Its SIGTERM handler is installed just
before its training stage and removed at its teardown; it stops after the current batch, where
:class:`~regfw.run.checkpoints.RunCheckpoint` saves. SIGINT's ``KeyboardInterrupt`` ends in
Lightning's ``sys.exit(1)``, which :func:`regfw.run.job.fit` turns into exit 130. Outside that span
(loading the config and the plugins, building the model, claiming the run directory, Lightning's
own set-up, and after its teardown: the final evaluation and the report) nothing would answer a
SIGTERM but the default action. :func:`install`, which the CLI calls first, before any heavy
import, puts one handler on both signals:

* while Lightning's SIGTERM handler is in place (Lightning calls the handler it found, this one,
  after its own), it leaves SIGTERM to Lightning;
* otherwise it raises :class:`~regfw.errors.Terminated` (SIGTERM) or ``KeyboardInterrupt``
  (SIGINT) where the process is, so that :func:`regfw.run.job.fit` removes what a start wrote
  before its first checkpoint and reports, with :func:`message`, what is kept;
* inside :func:`deferred` (while a run directory is being claimed) it only notes the signal,
  which is raised when the block ends, once the claim is complete and can be undone whole;
* once a signal is being acted on, a second one is only noted: it cannot cut the clean-up
  short (SIGKILL still ends the process at once).

Exit status: 143 (128 + SIGTERM) and 130 (128 + SIGINT), as a shell reports such a process.

Outside the CLI (a script calling ``Trainer.fit`` on a :class:`~regfw.train.module.RegularizedModule`) none
of this is installed and Lightning's handler alone answers SIGTERM, after the current batch, as for
a bare module. One regfw addition keeps that true when a batch is long: during a validation or test
epoch the MC dropout callback samples each batch T times (seconds with T = 10,000), and Lightning
looks at the signal only between batches (never after the last). :class:`EvaluationStop`, which the
module starts at each evaluation epoch, stops such an epoch at the signal itself.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from regfw.errors import RunInterrupted, Terminated

#: The exit status of ``regfw fit`` stopped by each signal.
EXIT_STATUS: dict[int, int] = {signal.SIGTERM: 143, signal.SIGINT: 130}
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _State:
    depth = 0  # inside deferred(): note, do not raise
    pending: int | None = None  # the signal noted inside deferred()
    stopping = False  # a signal is being acted on: later ones are only noted
    installed = False


_STATE = _State()


def _raise(signum: int) -> None:
    if signum == signal.SIGTERM:
        raise Terminated()
    raise KeyboardInterrupt()


def _handler(signum: int, frame: FrameType | None) -> None:
    if _STATE.stopping:
        return  # already stopping on an earlier signal
    if _STATE.depth:
        if _STATE.pending is None:
            _STATE.pending = signum
        return
    _STATE.stopping = True
    if signum == signal.SIGTERM and signal.getsignal(signal.SIGTERM) is not _handler:
        return  # Lightning's handler called this one after its own: it stops training after this batch
    _raise(signum)


def install() -> Callable[[], None]:
    """Handle SIGTERM and SIGINT as described above (main thread only; elsewhere a no-op).

    Returns the function that puts the previous handlers back (for callers of the CLI's
    ``main()`` inside a longer-lived process, such as the tests).
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous: dict[int, Any] = {s: signal.getsignal(s) for s in SIGNALS}
    _STATE.depth, _STATE.pending, _STATE.stopping, _STATE.installed = 0, None, False, True
    for s in SIGNALS:
        signal.signal(s, _handler)

    def restore() -> None:
        _STATE.stopping = True  # nothing raises while the handlers change
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        _STATE.depth, _STATE.pending, _STATE.stopping, _STATE.installed = 0, None, False, False

    return restore


def hold() -> None:
    """The command has finished (its status is settled, its output written): a signal from now
    on, while the process exits, is only noted and changes nothing."""
    _STATE.stopping = True


@contextlib.contextmanager
def deferred(*, drop: bool = False) -> Iterator[None]:
    """A block that a signal must not cut in two (claiming a run directory, removing one): a
    signal is noted and raised when the block ends, or dropped with ``drop`` (a clean-up on the
    way out: the process is already stopping). When the block itself raises, the noted signal
    is dropped too: the process is already stopping with that error."""
    _STATE.depth += 1
    try:
        yield
    except BaseException:
        _STATE.depth -= 1
        if not _STATE.depth and _STATE.pending is not None:
            _STATE.pending, _STATE.stopping = None, True
        raise
    _STATE.depth -= 1
    if not _STATE.depth and _STATE.pending is not None:
        signum, _STATE.pending = _STATE.pending, None
        _STATE.stopping = True
        if not drop:
            _raise(signum)


@contextlib.contextmanager
def lightning_interrupts(trainer: Any) -> Iterator[None]:
    """Around a Lightning entry point other than ``fit`` (``trainer.predict``): Lightning turns a
    ``KeyboardInterrupt`` into ``sys.exit(1)`` after its teardown; raise it again as the
    ``KeyboardInterrupt`` it was, so that the command exits 130 with its one line like every other
    command, and put back the SIGINT handler Lightning replaced with ``SIG_IGN``."""
    main = threading.current_thread() is threading.main_thread()
    sigint = signal.getsignal(signal.SIGINT) if main else None
    try:
        yield
    except SystemExit:
        from pytorch_lightning.trainer.states import TrainerStatus

        if trainer.state.status != TrainerStatus.INTERRUPTED:
            raise
        if sigint is not None:
            signal.signal(signal.SIGINT, sigint)
        raise KeyboardInterrupt() from None


class EvaluationStop:
    """While a validation or test epoch runs, a SIGTERM raises Lightning's ``SIGTERMException`` at
    once instead of after the epoch's current batch.

    Lightning's SIGTERM handler only notes the signal; its loops raise ``SIGTERMException`` between
    batches, and an evaluation epoch's last batch (with the MC dropout callback's T passes over it,
    and the epoch's metrics) runs to its end first. Nothing of an evaluation epoch is kept when it
    is cut short (its metrics are logged at its end), so stopping inside it loses nothing Lightning
    would have kept, and the process stops within a second as a bare module's does.

    :meth:`start` wraps the SIGTERM handler in place (Lightning's, which calls the one it found
    after its own) and :meth:`stop` puts it back. Nothing is wrapped off the main thread, with
    several processes (every rank must leave its collectives together: Lightning's own stop
    agrees first), or when a callback of the trainer says ``defers_sigterm`` (``regfw fit``'s
    :class:`~regfw.run.checkpoints.RunCheckpoint`, which makes a SIGTERM wait for the validation's
    checkpoint so that no training step is lost).
    """

    def __init__(self) -> None:
        self._handler: Callable[[int, FrameType | None], None] | None = None
        self._previous: Any = None

    def start(self, trainer: Any) -> None:
        self.stop()
        if trainer is None or threading.current_thread() is not threading.main_thread():
            return
        if getattr(trainer, "world_size", 1) > 1 or any(getattr(cb, "defers_sigterm", False)
                                                        for cb in getattr(trainer, "callbacks", ())):
            return
        previous = signal.getsignal(signal.SIGTERM)
        if not callable(previous):
            return  # not under Lightning's handler (the default action already ends the process)

        def handler(signum: int, frame: FrameType | None) -> None:
            previous(signum, frame)
            if getattr(trainer, "received_sigterm", False):
                from pytorch_lightning.utilities.exceptions import SIGTERMException

                raise SIGTERMException()

        signal.signal(signal.SIGTERM, handler)
        self._handler, self._previous = handler, previous

    def stop(self) -> None:
        """Put back the handler :meth:`start` wrapped, unless something replaced the wrapper since
        (Lightning's teardown after an exception puts back its own first handlers)."""
        handler, self._handler = self._handler, None
        if handler is not None and signal.getsignal(signal.SIGTERM) is handler:
            signal.signal(signal.SIGTERM, self._previous)
        self._previous = None


def signal_of(exc: BaseException) -> int | None:
    """The signal behind ``exc`` (:class:`Terminated`: SIGTERM; ``KeyboardInterrupt``: SIGINT)."""
    if isinstance(exc, Terminated):
        return signal.SIGTERM
    if isinstance(exc, KeyboardInterrupt):
        return signal.SIGINT
    return None


@dataclass
class RunState:
    """Where a fit stood when a signal stopped it, for :func:`message`."""

    signum: int
    #: The config, for the commands the message suggests (``CONFIG`` when it came from Python).
    source: str | None = None
    #: ``--resume``: the run to resume is there whether or not this start claimed it.
    resume: bool = False
    #: The run directory (None: none was claimed yet).
    run_dir: Path | None = None
    #: The run directory this start created was removed (no checkpoint was written in it).
    removed: bool = False
    #: The newest complete checkpoint of the run and its global step (None: there is none).
    checkpoint: Path | None = None
    checkpoint_step: int | None = None
    #: Where training stood (None: it had not begun), and whether this start trained any step.
    step: int | None = None
    epoch: int | None = None
    trained: bool = False
    #: The checkpoint was written at the step the signal arrived.
    saved_now: bool = False
    #: Training had finished (``max_epochs`` or ``max_steps`` reached, its checkpoint written).
    finished: bool = False
    #: What was going on after training (``during the final evaluation``).
    during: str = ""
    max_epochs: int | None = None


def _what(signum: int) -> str:
    return "stopped by SIGTERM" if signum == signal.SIGTERM else "interrupted (SIGINT)"


def message(state: RunState) -> str:
    """One line: the signal, the moment, what is kept and how to go on."""
    what, src = _what(state.signum), state.source or "CONFIG"
    ckpt = "" if state.checkpoint is None else (
        f"{state.checkpoint}" + (f" (global step {state.checkpoint_step})" if state.checkpoint_step is not None
                                 else ""))
    if state.run_dir is not None and not state.removed:
        resume = f"`regfw fit {src} --run-dir {state.run_dir} --resume`"
    else:
        resume = f"`regfw fit {src} --resume {state.checkpoint}`"
    at = (f"at global step {state.step} (epoch {state.epoch})" if state.trained
          else "during start-up, before the first training step")
    if state.finished and state.checkpoint is not None:
        more = (f" trainer.max_epochs={state.max_epochs + 1}" if isinstance(state.max_epochs, int)
                and state.max_epochs >= 0 else "")
        further = f"`regfw fit {src} --run-dir {state.run_dir} --resume{more}`"
        return (f"{what} after training finished{', ' + state.during if state.during else ''}; the run is complete: "
                f"checkpoint {ckpt} holds the trained weights (to train further: {further}).")
    if state.checkpoint is None:
        if state.run_dir is None:
            then = "the run to resume is unchanged (run the same command again)" if state.resume else \
                "there is nothing to resume"
            return f"{what} during start-up, before anything was written; {then}."
        removed = (f"the new run directory {state.run_dir} was removed" if state.removed else
                   f"what it had written in {state.run_dir} was removed") + ", so there is nothing to resume"
        if not state.trained:
            return f"{what} {at}; {removed}."
        return (f"{what} {at}, before the first checkpoint; {removed} (run.checkpoint_every_n_steps saves "
                f"checkpoints/last.ckpt more often).")
    if state.saved_now:
        return f"{what} {at}; saved {state.checkpoint} at global step {state.step}. Continue with {resume}."
    if not state.trained:
        return f"{what} {at}; the run is as it was: checkpoint {ckpt} is complete. Continue with {resume}."
    return (f"{what} {at}; the newest checkpoint is {ckpt}; resuming repeats the steps after it. "
            f"Continue with {resume}.")


def finished(trainer: Any) -> bool:
    """Whether ``trainer`` has trained all it was asked to (``max_steps`` or ``max_epochs``)."""
    max_steps, max_epochs = trainer.max_steps, trainer.max_epochs
    if max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps:
        return True
    return max_epochs is not None and max_epochs >= 0 and trainer.current_epoch >= max_epochs


def stopped(signum: int, cfg: Any, path: Path | None, claim: Any, ckpt_path: Path | None, ckpt: dict,
            trainer: Any = None, ckpt_cb: Any = None, during: str = "", rank: int = 0) -> RunInterrupted:
    """The :class:`~regfw.errors.RunInterrupted` of :func:`regfw.run.job.fit` for a signal, from where the
    fit stood: its config, run directory and claim (:class:`regfw.run.rundir.Claim`; a start without a
    checkpoint of its own is removed, ``claim.keep`` false), the checkpoint it resumed from, and,
    once they exist, its Trainer and :class:`~regfw.run.checkpoints.RunCheckpoint`."""
    state = RunState(signum, cfg.source, run_dir=path, removed=claim is not None and not claim.keep
                     and bool(claim.created), max_epochs=cfg.trainer.get("max_epochs"), during=during)
    if ckpt_path is not None:
        state.checkpoint, state.checkpoint_step = ckpt_path, ckpt.get("global_step")
    if ckpt_cb is not None and ckpt_cb.last_saved_step is not None and ckpt_cb.last_path.is_file():
        state.checkpoint, state.checkpoint_step = ckpt_cb.last_path, ckpt_cb.last_saved_step
    if trainer is not None:
        state.step, state.epoch = trainer.global_step, trainer.current_epoch
        state.trained = trainer.global_step > int(ckpt.get("global_step") or 0)
        state.saved_now = bool(ckpt_cb is not None and ckpt_cb.saved_on_sigterm and state.checkpoint_step == state.step)
        state.finished = finished(trainer) and state.checkpoint_step == state.step
    return RunInterrupted(message(state), exit_code=EXIT_STATUS[signum], quiet=rank != 0)
