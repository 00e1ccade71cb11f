"""Crash-safe files: the one way kfloop replaces a file on a local disk.

:func:`atomic_write` writes a temporary file beside the target, fsyncs it,
renames it into place and fsyncs the folder, so after a crash at any moment
the target holds either the old content or the new one -- never an empty or
half-written file -- and a completed write survives a power cut.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

__all__ = ["atomic_write", "fsync_folder"]


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
