"""Claiming a run directory: atomically, by one process at a time, and only ever regfw's own files.

* **A marker only regfw writes** (:data:`MARKER`, ``.regfw-run``) says a directory is a regfw
  run. ``--force`` replaces a directory only when it has one, and deletes only the files regfw
  writes there (:func:`foreign_files` lists any other; their presence refuses ``--force``), so a
  user's ``config.yaml`` or ``thesis.tex`` is never taken for a run, nor deleted.
* **An owner lock** (:data:`LOCK`, ``.regfw-lock``) held with ``flock`` for as long as a process
  trains in the directory, with the owner's PID, host and start time in it. Two processes that
  start in one new directory, or two ``--resume`` of one run, cannot both hold it: the second
  refuses, naming the first. A lock left by a killed process is stale: the kernel released it
  with the process, and the next claim takes it over (on systems without ``flock``, a lock
  whose PID no longer runs on this host is stale).
* **Nothing half-made**: :meth:`Claim.abandon` removes what a start that failed before its first
  checkpoint wrote (the directory, when this start created it), so a failed start leaves nothing
  for ``--resume`` to pick up; :meth:`Claim.clean_temporaries` removes the ``.NAME.tmp-PID``
  files a kill during an atomic write (:mod:`regfw.run.atomic`) left behind.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from regfw import __version__
from regfw.errors import RunError
from regfw.run.atomic import kind_of, os_error_line, write_atomic

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: the PID in the lock decides
    fcntl = None  # type: ignore[assignment]

#: Written by regfw into every run directory it creates; ``--force`` needs it.
MARKER = ".regfw-run"
#: The owner lock of a run directory (held with ``flock`` while a process trains there).
LOCK = ".regfw-lock"

#: Temporary files of :func:`regfw.run.atomic.atomic_open`: ``.NAME.tmp-PID``.
TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)$")
_TOP = re.compile(r"^(config\.yaml|plan\.txt|metrics\.csv|hparams\.yaml|resume-\d+\.yaml|"
                  + re.escape(MARKER) + "|" + re.escape(LOCK) + r")$")
_CHECKPOINT = re.compile(r"^.+\.ckpt$")
_PLOT = re.compile(r"^epoch=\d+$")


def _regfw_file(rel: Path) -> bool:
    """Whether ``rel`` (relative to a run directory) is a file regfw writes there."""
    parts = rel.parts
    if TEMPORARY.match(parts[-1]):
        return True
    if len(parts) == 1:
        return bool(_TOP.match(parts[0]))
    if parts[0] == "checkpoints" and len(parts) == 2:
        return bool(_CHECKPOINT.match(parts[1]))
    if parts[0] == "tensorboard":  # trainer.logger: tensorboard
        return True
    if parts[0] == "plots":
        return len(parts) == 3 and bool(_PLOT.match(parts[1])) and parts[2].endswith((".svg", ".png"))
    return False


def foreign_files(path: Path) -> list[str]:
    """Files (and links) under ``path`` that regfw does not write into a run directory."""
    out = []
    for child in sorted(path.rglob("*")):
        rel = child.relative_to(path)
        if child.is_dir() and not child.is_symlink():
            continue
        if child.is_symlink() or not _regfw_file(rel):
            out.append(str(rel))
    return out


def is_run(path: Path) -> bool:
    """Whether ``path`` is a directory regfw made a run in (it has the marker)."""
    return (path / MARKER).is_file()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's process
        return True
    return True


def _owner(lock: Path) -> dict:
    try:
        data = json.loads(lock.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _in_use(path: Path, owner: dict) -> RunError:
    who = f"process {owner.get('pid', '?')}" + (f" on {owner['host']}" if owner.get("host") else "")
    since = f" since {owner['started']}" if owner.get("started") else ""
    return RunError(f"run directory {str(path)!r} is in use by {who}{since} (lock {LOCK}); wait for it to finish "
                    f"or stop it, or choose another --run-dir.")


@dataclass
class Claim:
    """A run directory this process holds the lock of; :meth:`release` when done."""

    path: Path
    #: This start created the directory (and these parents): :meth:`abandon` removes them.
    created: list[Path] = field(default_factory=list)
    #: Files this start wrote, relative to ``path``, for :meth:`abandon`.
    written: list[str] = field(default_factory=list)
    #: A checkpoint was written: a failed run is kept (for ``--resume``), not abandoned.
    keep: bool = False
    _handle: IO[str] | None = None

    def keep_run(self) -> None:
        """Called at each checkpoint save: from now on the directory holds a resumable run."""
        self.keep = True

    def _lock(self) -> None:
        lock = self.path / LOCK
        handle = open(lock, "a+")  # noqa: SIM115 - held open for the run's lifetime
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                raise _in_use(self.path, _owner(lock)) from None
        else:  # pragma: no cover
            owner = _owner(lock)
            pid = owner.get("pid")
            if isinstance(pid, int) and pid != os.getpid() and owner.get("host") == socket.gethostname() \
                    and _pid_alive(pid):
                handle.close()
                raise _in_use(self.path, owner)
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
        handle.flush()
        self._handle = handle

    def mark(self) -> None:
        """Write :data:`MARKER` (a new run directory)."""
        write_atomic(self.path / MARKER, json.dumps({"regfw": __version__, "created": time.strftime(
            "%Y-%m-%d %H:%M:%S")}) + "\n")
        self.written.append(MARKER)

    def write(self, name: str, text: str) -> Path:
        """Write ``name`` in the run directory atomically, remembered for :meth:`abandon`."""
        write_atomic(self.path / name, text)
        self.written.append(name)
        return self.path / name

    def clean_temporaries(self) -> list[str]:
        """Remove the ``.NAME.tmp-PID`` files an interrupted atomic write left (none can be in
        use: this process holds the directory's lock)."""
        removed = []
        for directory in (self.path, self.path / "checkpoints", *(self.path / "plots").glob("epoch=*")):
            if not directory.is_dir():
                continue
            for child in directory.iterdir():
                if TEMPORARY.match(child.name) and child.is_file() and int(
                        TEMPORARY.match(child.name).group(1)) != os.getpid():  # type: ignore[union-attr]
                    child.unlink(missing_ok=True)
                    removed.append(str(child.relative_to(self.path)))
        return removed

    def release(self) -> None:
        """Give up the lock (the lock file stays: removing it would race with a waiting claim)."""
        if self._handle is not None:
            with _quietly():
                self._handle.seek(0)
                self._handle.truncate()
            self._handle.close()
            self._handle = None

    def abandon(self) -> None:
        """Undo a start that failed before its first checkpoint: remove what it wrote."""
        if self.created:
            self.release()
            shutil.rmtree(self.path, ignore_errors=True)
            for parent in reversed(self.created[:-1] if self.created[-1] == self.path else self.created):
                with _quietly():
                    parent.rmdir()  # only while empty: another run may have started beside this one
            return
        for name in reversed(self.written):
            (self.path / name).unlink(missing_ok=True)
        if MARKER in self.written:  # a new run in a given empty directory: all of regfw's files there are this
            for child in self.path.rglob("*"):  # start's, also those Lightning's logger wrote (hparams.yaml)
                if child.is_file() and not child.is_symlink() and child.name != LOCK and _regfw_file(
                        child.relative_to(self.path)):
                    child.unlink(missing_ok=True)
        for sub in ("checkpoints", "plots", "tensorboard"):
            with _quietly():
                for d in sorted((self.path / sub).rglob("*"), reverse=True):
                    if d.is_dir():
                        d.rmdir()
                (self.path / sub).rmdir()
        self.release()
        if self.written and MARKER in self.written:
            (self.path / LOCK).unlink(missing_ok=True)


def _held(path: Path) -> bool:
    """Whether a live process holds the lock of ``path`` (probed without creating a file)."""
    lock = path / LOCK
    if not lock.is_file():
        return False
    if fcntl is None:  # pragma: no cover
        pid = _owner(lock).get("pid")
        return isinstance(pid, int) and _pid_alive(pid)
    with open(lock) as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    return False


class _quietly:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return exc[0] is not None and issubclass(exc[0], OSError)


def _mkdirs(path: Path) -> list[Path]:
    """``mkdir -p path``; returns the directories it created, outermost first."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    made = []
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        made.append(d)
    return made


def _replace(path: Path) -> None:
    """Delete the files of the earlier regfw run in ``path`` (``--force``), after checking that all
    of them are regfw's."""
    if not is_run(path):
        hint = (" (it has a config.yaml, but no regfw run marker: regfw did not make it, or an older version did)"
                if (path / "config.yaml").exists() else "")
        raise RunError(f"run directory {str(path)!r} is not empty and holds no regfw run{hint}; --force replaces "
                       f"only a run directory regfw made ({MARKER}). Choose a new or empty directory.")
    foreign = foreign_files(path)
    if foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise RunError(f"run directory {str(path)!r} holds files regfw did not write ({listed}); --force deletes "
                       f"only regfw's own files. Move those away, or choose another directory.")
    for child in path.iterdir():
        if child.name == LOCK:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def claim_new(path: Path, *, explicit: bool, force: bool = False) -> Claim:
    """Create (or, ``explicit``, take the new or empty) run directory ``path`` and lock it.

    A generated ``path`` must not exist (``mkdir`` decides, atomically); an explicit one may
    exist when empty, or with ``force`` when it holds an earlier regfw run. The emptiness check
    is made again once the lock is held, so two processes never share one directory.
    """
    kind = kind_of(path)
    if kind == "symbolic link" and not path.exists():
        raise RunError(f"run directory {str(path)!r} is a symbolic link to {os.readlink(path)!r}, which does not "
                       f"exist; create that directory first, remove the link, or choose another directory.")
    if kind is not None and not path.is_dir():
        raise RunError(f"run directory {str(path)!r} is a {'file' if kind == 'regular file' else kind}; choose a "
                       f"directory.")
    try:
        return _claim_new(path, explicit=explicit, force=force)
    except FileExistsError:
        if not explicit:
            raise  # the caller picks another name
        raise RunError(os_error_line(FileExistsError(errno.EEXIST, "File exists"), path,
                                     "cannot create run directory")) from None
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # regfw.run.job reports a full disk with what of the run was kept
        raise RunError(os_error_line(exc, exc.filename or path, "cannot create run directory")) from None


def _claim_new(path: Path, *, explicit: bool, force: bool) -> Claim:
    if explicit and path.is_dir():
        if _held(path):
            raise _in_use(path, _owner(path / LOCK))
        _check_reusable(path, force)  # refuse before writing anything into a user's directory
    if explicit:
        created = _mkdirs(path)
    else:
        created = _mkdirs(path.parent)
        path.mkdir()  # FileExistsError: the caller picks another name
        created.append(path)
    claim = Claim(path, created=created)
    try:
        claim._lock()
        if explicit and not created:
            _check_reusable(path, force)  # again, now that no other process can start here
            if force and any(c.name != LOCK for c in path.iterdir()):
                _replace(path)
        claim.mark()
    except BaseException:
        if created:
            claim.abandon()
        else:
            claim.release()
        raise
    return claim


def _check_reusable(path: Path, force: bool) -> None:
    if not any(c.name != LOCK for c in path.iterdir()):
        return
    if not force:
        raise RunError(f"run directory {str(path)!r} exists and is not empty; choose a new one, continue "
                       f"it with `regfw fit CONFIG --run-dir {path} --resume`, or replace it with --force")
    if not is_run(path) or foreign_files(path):
        _replace(path)  # raises with the reason


def claim_existing(path: Path) -> Claim:
    """Lock the run directory ``path`` to continue it (``--resume``), removing stale temporaries."""
    claim = Claim(path)
    try:
        claim._lock()
        claim.clean_temporaries()
    except OSError as exc:  # a read-only run directory, a lock file that is not a file
        claim.release()
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise RunError(os_error_line(exc, exc.filename or path, "cannot continue the run in")) from None
    return claim
