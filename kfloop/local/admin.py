"""The local serving runtime's admin API: what the trigger's rollout and ``kfloop status`` call.

``GET /status``; ``GET /metrics`` (the autoscaler's decisions and signals);
``POST /replicas`` ``{"replicas": n}``; ``POST /version`` ``{"version": "3"}``;
``POST /traffic`` ``{"weights": {"2": 90, "3": 10}}`` (optional ``"mirror": "4"``:
a shadow version that gets a copy of every request). The ``POST`` s change what
is served and need the runtime's home token and a loopback ``Host``; the
``GET`` s only read. Built with :func:`kfloop.serving.control.control_app` like
the servers' control ports: credentials, body limit and JSON errors come from
there. :class:`~kfloop.local.stack.LocalStack` starts it beside the runtime.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from kfloop.credentials import local_token
from kfloop.errors import InputError
from kfloop.local.runtime import ServingRuntime
from kfloop.registry import checked_version
from kfloop.serving.auth import Authenticator, LocalToken
from kfloop.serving.control import control_app, control_json
from kfloop.serving.listeners import ServerThread, listening

__all__ = ["READ_ONLY_PATHS", "AdminServer"]

READ_ONLY_PATHS = frozenset({"/status", "/metrics"})  # open to read; every other path needs the token


class AdminServer:
    """The admin API of ``runtime`` on ``host:port`` (0: a free port), in a thread of this process."""

    def __init__(self, runtime: ServingRuntime, port: int, host: str = "127.0.0.1",
                 authenticator: Authenticator | None = None) -> None:
        app = control_app(lambda api: _routes(api, runtime), authenticator or LocalToken(local_token(runtime.home)),
                          title="kfloop runtime admin", protects=lambda path: path not in READ_ONLY_PATHS)
        self.server = ServerThread(app, listening(host, port, "the runtime's admin API"), name="kfloop-admin")

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()


def _routes(api: FastAPI, runtime: ServingRuntime) -> None:
    """The admin routes; a change runs in a worker thread (it starts and drains replicas for seconds)."""

    @api.get("/status")
    async def status() -> dict[str, Any]:
        return runtime.status()

    @api.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @api.post("/replicas")
    async def replicas(request: Request) -> dict[str, Any]:
        body = await control_json(request)
        return {"replicas": await run_in_threadpool(runtime.scale, _whole_number(body, "replicas"))}

    @api.post("/version")
    async def version(request: Request) -> dict[str, Any]:
        body = await control_json(request)
        await run_in_threadpool(runtime.switch_version, checked_version(str(_field(body, "version"))))
        return runtime.status()

    @api.post("/traffic")
    async def traffic(request: Request) -> dict[str, Any]:
        body = await control_json(request)
        weights = _field(body, "weights")
        if not isinstance(weights, dict):
            raise InputError('"weights" must be an object: {"2": 90, "3": 10}')
        mirror = body.get("mirror")
        if mirror is not None and not isinstance(mirror, (str, int)):
            raise InputError('"mirror" must be a version, e.g. "4"')
        split = {checked_version(str(k)): _number(v, f"weights.{k}") for k, v in weights.items()}
        await run_in_threadpool(runtime.set_traffic, split, None if mirror is None else checked_version(str(mirror)))
        return runtime.status()


def _field(body: dict[str, Any], field: str) -> Any:
    if field not in body:
        raise InputError(f"the body lacks the field {field!r}")
    return body[field]


def _number(value: Any, field: str) -> float:
    """A JSON number (not a boolean, not NaN or infinite) from an admin body."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value in (float("inf"), float("-inf")):
        raise InputError(f"{field} must be a finite number, got {value!r}")
    return float(value)


def _whole_number(body: dict[str, Any], field: str) -> int:
    value = _field(body, field)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{field} must be a whole number, got {value!r}")
    return value
