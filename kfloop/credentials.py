"""Bearer credentials: the one local token per ``KFLOOP_HOME``, and token files a client sends from.

On one machine every kfloop service started with the same home folder shares
one random bearer token, kept in ``HOME/token`` with mode 0600 (only the
user who runs kfloop can read it). :func:`local_token` creates it at first
use -- atomically, so two services starting at once agree on one token --
and ``kfloop token`` prints it. Clients send it as ``Authorization: Bearer
<token>`` (:func:`bearer`).

:class:`TokenFile` is what a sender holds: a path whose token is re-read
when the file changes, since a cluster's projected ServiceAccount token is
rotated in place by the kubelet.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from kfloop.durable import fsync_folder
from kfloop.errors import InputError

__all__ = ["TOKEN_FILE", "TokenFile", "bearer", "local_token", "read_token", "token_path"]

TOKEN_FILE = "token"
TOKEN_BYTES = 32  # 256 bits, URL-safe base64: 43 characters


def token_path(home: Path) -> Path:
    """Where the local token of ``home`` lives."""
    return Path(home) / TOKEN_FILE


def local_token(home: Path) -> str:
    """The bearer token of ``home``, created (mode 0600) if there is none yet."""
    path = token_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        _create(path)
    return read_token(path)


def _create(path: Path) -> None:
    """Write a new token to a private temporary file and link it into place; a concurrent creator's token wins once."""
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    handle = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(handle, (secrets.token_urlsafe(TOKEN_BYTES) + "\n").encode())
        os.fsync(handle)
        os.close(handle)
        try:
            os.link(tmp, path)  # fails if another process created the token first: then its token is the one
        except FileExistsError:
            pass
        fsync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def read_token(path: Path) -> str:
    """The token in ``path`` (one line); an :class:`~kfloop.errors.InputError` naming the file if it has none."""
    path = Path(path)
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise InputError(f"{path}: cannot read the token file ({exc.strerror})") from None
    if not token or any(c.isspace() for c in token):
        raise InputError(f"{path}: the token file must hold one token on one line")
    return token


def bearer(token: str) -> dict[str, str]:
    """The ``Authorization`` header that presents ``token``."""
    return {"authorization": f"Bearer {token}"}


class TokenFile:
    """A token file a client sends from; re-read when it changes (rotated ServiceAccount tokens)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._seen: tuple[float, int] | None = None
        self._token = ""

    def token(self) -> str:
        stat = self.path.stat() if self.path.exists() else None
        stamp = (stat.st_mtime, stat.st_ino) if stat else None
        if stamp is None or stamp != self._seen:
            self._token = read_token(self.path)
            self._seen = stamp
        return self._token

    def headers(self) -> dict[str, str]:
        """``Authorization: Bearer`` with the file's current token."""
        return bearer(self.token())
