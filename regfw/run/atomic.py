"""Atomic file writes: the one place regfw writes a file that someone may read or resume from.

A file is written to a temporary file in the same directory, flushed to disk and renamed over
the target (``os.replace``), so readers see the old file or the complete new one, never half of
one; the temporary file is removed when writing fails.

Only a regular file is ever replaced: a target that exists as anything else (a device, a FIFO,
a socket, a directory, a symbolic link, dangling or not) is refused by :func:`check_target`,
checked with ``os.lstat`` so that a link is judged as itself, not as what it points to. A write
to a path a user gave (``regfw predict --out``, ``regfw init``) also refuses an existing regular
file unless asked to replace it (``replace=True``, the commands' ``--force``); that refusal is
made at the rename as well (a hard link that fails when the name exists), so a file that
appears while regfw writes is not replaced either. :func:`write_output` is that write with every
``OSError`` a user can fix turned into one line naming the path and the fix.
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Union

from regfw.errors import OutputError

PathLike = Union[str, "os.PathLike[str]"]

#: What ``os.lstat`` says a path is, for the messages that refuse to replace it.
_KINDS = ((stat.S_ISLNK, "symbolic link"), (stat.S_ISDIR, "directory"), (stat.S_ISCHR, "character device"),
          (stat.S_ISBLK, "block device"), (stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISSOCK, "socket"))


def kind_of(path: PathLike) -> str | None:
    """What ``path`` is, by ``os.lstat`` (a link as itself): ``"regular file"``, ``"directory"``,
    ``"symbolic link"`` (also a dangling one), a device, FIFO or socket; None when nothing is there."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except NotADirectoryError:  # a parent is a file: nothing can be at path
        return None
    if stat.S_ISREG(mode):
        return "regular file"
    return next((name for test, name in _KINDS if test(mode)), "special file")


def check_target(path: PathLike, *, replace: bool = True, flag: str = "--force") -> None:
    """Refuse to write ``path`` when something regfw must not replace is there: anything but a
    regular file always, an existing regular file too unless ``replace`` (``flag`` names the
    option that allows it, for the message)."""
    try:
        kind = kind_of(path)
    except OSError as exc:  # a name too long, a loop of links, a directory that cannot be searched
        raise OutputError(os_error_line(exc, path)) from None
    if kind is None:
        blocking = next((p for p in Path(path).parents if kind_of(p) not in (None, "directory")
                         and not p.is_dir()), None)
        if blocking is not None:
            raise OutputError(f"cannot write {os.fspath(path)!r}: {os.fspath(blocking)!r} is a {kind_of(blocking)}, "
                              f"not a directory; choose another path.")
        return
    if kind != "regular file":
        target = ""
        if kind == "symbolic link":
            link = os.readlink(path)
            target = f" to {link!r}" + ("" if os.path.exists(path) else ", which does not exist")
        raise OutputError(f"{os.fspath(path)!r} is a {kind}{target}; regfw writes only regular files and never "
                          f"replaces anything else, not even with {flag}. Choose another path.")
    if not replace:
        raise OutputError(f"{os.fspath(path)!r} exists; choose another path or pass {flag} to replace it.")


def fsync_dir(directory: Path) -> None:
    """Flush a directory entry (the rename) to disk, where the platform allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - not every platform opens directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


class _RecordingFile:
    """A file whose failed writes are remembered: ``torch.save`` turns an ``OSError`` of its
    file's ``write`` (a full disk) into a ``RuntimeError`` naming a C++ source line instead."""

    def __init__(self, f: IO) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _open_temporary(path: Path, mode: str, **kwargs: Any) -> IO:
    """Open the temporary file of :func:`atomic_open` (tests replace this to simulate a full disk)."""
    return open(path, mode, **kwargs)  # noqa: SIM115 - closed by atomic_open


def _link_new(tmp: Path, path: Path, flag: str) -> None:
    """Put ``tmp`` at ``path`` only if nothing is there (a hard link fails when the name exists);
    where the file system has no hard links, check and rename."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        check_target(path, replace=False, flag=flag)  # raises: it appeared while regfw wrote
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV):
            raise
        check_target(path, replace=False, flag=flag)
        os.replace(tmp, path)
        return
    tmp.unlink()


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "w", *, replace: bool = True, flag: str = "--force",
                **kwargs: Any) -> Iterator[IO]:
    """Open ``path`` for writing through a temporary file that replaces it on success.

    Only a regular file is replaced, and with ``replace`` False not even that (see
    :func:`check_target`; ``flag`` is the option the refusal names): both are checked before
    writing and again at the rename. A write that fails for lack of space raises
    ``OSError(ENOSPC)`` naming ``path``, also when the writer (``torch.save``) reported it
    otherwise; the temporary file is removed.
    """
    path = Path(path)
    check_target(path, replace=replace, flag=flag)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    recording: _RecordingFile | None = None
    try:
        with _open_temporary(tmp, mode, **kwargs) as f:
            recording = _RecordingFile(f)
            yield recording  # type: ignore[misc]
            f.flush()
            os.fsync(f.fileno())
        if replace:
            check_target(path, flag=flag)  # nothing but a regular file appeared there meanwhile
            os.replace(tmp, path)
        else:
            _link_new(tmp, path, flag)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        cause = exc if isinstance(exc, OSError) else (recording.error if recording is not None else None)
        if cause is not None and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(cause.errno, os.strerror(cause.errno), str(path)) from None
        raise
    fsync_dir(path.parent)


def write_atomic(path: PathLike, text: str, *, replace: bool = True, flag: str = "--force") -> None:
    """Write ``text`` to ``path`` atomically (``replace``, ``flag``: as for :func:`atomic_open`)."""
    with atomic_open(path, "w", replace=replace, flag=flag) as f:
        f.write(text)


#: The fix a user can make for each ``OSError`` of writing a file, by errno.
_FIXES: dict[int, str] = {
    errno.ENOSPC: "free some space, or write it elsewhere",
    errno.EDQUOT: "free some space within your quota, or write it elsewhere",
    errno.EACCES: "it or its directory is not writable by you; make it writable, or choose another location",
    errno.EPERM: "it or its directory is not writable by you; make it writable, or choose another location",
    errno.EROFS: "that file system is read-only; choose a writable location",
    errno.ENAMETOOLONG: "a name in the path is longer than the file system allows (usually 255 bytes); "
                        "choose a shorter name",
    errno.ENOTDIR: "a part of the path is a file; choose another path",
    errno.EEXIST: "something that is not a directory is in the way of the path; choose another path",
    errno.EISDIR: "it is a directory; give a file path",
    errno.ELOOP: "the path has a loop of symbolic links; choose another path",
}


def os_error_line(exc: OSError, path: PathLike, what: str = "cannot write") -> str:
    """One line for an ``OSError`` of writing ``path``: the path, the reason and the fix."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    fix = _FIXES.get(exc.errno or -1, "check the path and its directory")
    return f"{what} {os.fspath(path)!r}: {reason.lower()}; {fix}."


def write_output(path: PathLike, data: str | bytes, *, force: bool = False, flag: str = "--force") -> Path:
    """Write a file at a path a user gave: atomically, never over anything but a regular file,
    over an existing one only with ``force``, and any ``OSError`` a user can fix (a full disk, a
    read-only directory, a name too long, a parent that is a file) as an
    :class:`~regfw.errors.OutputError` naming the path and the fix."""
    path = Path(path)
    try:
        with atomic_open(path, "wb" if isinstance(data, bytes) else "w", replace=force, flag=flag) as f:
            f.write(data)
    except OSError as exc:
        raise OutputError(os_error_line(exc, path)) from None
    return path
