"""Serving an ASGI app on a port of a kfloop process: the port bound first, then served by uvicorn.

:func:`listening` binds a port before anything is served (a taken port is one clear error; connections
wait in the backlog until the app serves them); :func:`uvicorn_config` is how kfloop's own apps are served
(bounded headers, no access log); :func:`serve` serves a process's main app until SIGTERM or SIGINT, and
:class:`ServerThread` one more app on its own thread and event loop. Used by :mod:`kfloop.serving.server` (control ports),
:mod:`kfloop.serving.watch_app` (both ports of the watch), ``kfloop trigger``, :mod:`kfloop.local.admin` and
in-process tests.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Literal

import uvicorn

from kfloop.errors import InputError, PermanentError
from kfloop.serving.limits import HeaderLimitedHttp

__all__ = ["START_TIMEOUT", "ServerThread", "listening", "serve", "uvicorn_config"]

START_TIMEOUT = 10.0  # seconds for a server on a thread to take requests
Lifespan = Literal["on", "off"]


def listening(host: str, port: int, what: str) -> socket.socket:
    """A socket listening on ``host:port`` (``0``: a free port) for ``what``; an :class:`InputError` naming both
    if the port is taken."""
    try:
        return socket.create_server((host, port))
    except OSError as exc:
        raise InputError(f"cannot listen on {host}:{port} for {what}: {exc.strerror}") from None


def uvicorn_config(app: Any, *, lifespan: Lifespan = "off") -> uvicorn.Config:
    """How kfloop serves its own apps: bounded headers, warnings only, no access log."""
    return uvicorn.Config(app, log_level="warning", access_log=False, http=HeaderLimitedHttp, lifespan=lifespan)


def serve(app: Any, sock: socket.socket) -> None:
    """Serve ``app`` on ``sock`` in this (the main) thread until SIGTERM or SIGINT; its lifespan runs."""
    uvicorn.Server(uvicorn_config(app, lifespan="on")).run(sockets=[sock])


class ServerThread:
    """``app`` served on ``sock`` by uvicorn on a thread of its own (signals stay with the main thread)."""

    def __init__(self, app: Any, sock: socket.socket, name: str, *, lifespan: Lifespan = "off") -> None:
        self.socket = sock
        self.server = uvicorn.Server(uvicorn_config(app, lifespan=lifespan))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name=name, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.socket.getsockname()[:2]
        return f"http://{host}:{port}"

    def start(self) -> None:
        """Serve, and return once the app takes requests (its lifespan's start-up done)."""
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self.server.started:
            raise PermanentError(f"the server on {self.url} did not start; see the log")

    def stop(self, timeout: float = START_TIMEOUT) -> None:
        """Stop serving (the lifespan's shutdown runs) and close the socket."""
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout)
        self.socket.close()
