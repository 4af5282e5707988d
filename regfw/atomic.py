"""Atomic file writes: the one place regfw writes a file that someone may read or resume from.

A file is written to a temporary file in the same directory, flushed to disk and renamed over
the target (``os.replace``), so readers see the old file or the complete new one, never half of
one; the temporary file is removed when writing fails.
"""
from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Union

PathLike = Union[str, "os.PathLike[str]"]


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


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open ``path`` for writing through a temporary file that replaces it on success.

    A write that fails for lack of space raises ``OSError(ENOSPC)`` naming ``path``, also when
    the writer (``torch.save``) reported it otherwise; the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    recording: _RecordingFile | None = None
    try:
        with _open_temporary(tmp, mode, **kwargs) as f:
            recording = _RecordingFile(f)
            yield recording  # type: ignore[misc]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        cause = exc if isinstance(exc, OSError) else (recording.error if recording is not None else None)
        if cause is not None and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(cause.errno, os.strerror(cause.errno), str(path)) from None
        raise
    fsync_dir(path.parent)


def write_atomic(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)
