"""Crash-safe files: the one way kfloop replaces a file on a local disk, and appends a record whole.

:func:`atomic_write` writes a temporary file beside the target, fsyncs it,
renames it into place and fsyncs the folder, so after a crash at any moment
the target holds either the old content or the new one -- never an empty or
half-written file -- and a completed write survives a power cut.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

__all__ = ["TornAppend", "append_whole", "atomic_write", "fsync_folder"]


def fsync_folder(folder: Path) -> None:
    """Make the folder's entries (a rename, a new or removed file) durable."""
    handle = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def atomic_write(path: Path | str, data: bytes | str) -> None:
    """Replace ``path`` with ``data`` (text is UTF-8), durably and all at once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    payload = data.encode() if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)



class TornAppend(OSError):
    """An append failed and the file could not be cut back: it ends in a partial record."""


def append_whole(fd: int, data: bytes, size: int) -> None:
    """Append ``data`` to the file open at ``fd`` (now ``size`` bytes long) in full, or leave it as it was.

    On an ``OSError`` (a full disk) the file is cut back to ``size`` and the
    error raised; if even that fails, :class:`TornAppend` is raised, and the
    caller must not append to that file again.
    """
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError as exc:
        try:
            os.ftruncate(fd, size)
        except OSError:
            raise TornAppend(exc.errno, f"append failed ({exc.strerror}) and the file could not be cut back") from exc
        raise
