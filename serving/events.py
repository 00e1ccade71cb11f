"""The CloudEvent app base that the watch and the trigger share: ``POST /`` events plus the service routes.

:func:`create_event_app` builds a FastAPI app around an :class:`EventService`:
``POST /`` parses the delivery as a CloudEvent (binary or structured mode;
anything else is an :class:`~kfloop.errors.InputError`) and hands it to the
service; ``GET /status``, ``GET /healthz`` and ``GET /metrics`` answer for the
service. Every :class:`~kfloop.errors.KfloopError` becomes an answer through
:func:`kfloop.errors.to_http` (``{"error": ...}`` with the error's status).

Replies never carry a CloudEvent -- no ``ce-*`` headers, no body on success --
so a Knative Trigger subscriber cannot loop a reply back into its Broker: 202
accepted (what was done in a header), 204 ignored (the reason in
``x-kfloop-ignored``), 4xx/5xx with ``{"error": reason}``.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol

import orjson
from cloudevents.exceptions import GenericException
from cloudevents.http import CloudEvent, from_http
from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kfloop.errors import InputError, KfloopError, to_http
from kfloop.serving.deliveries import delivery_key

__all__ = ["IGNORED_HEADER", "Delivery", "EventReply", "EventService", "create_event_app", "error_response", "parse_cloudevent"]

IGNORED_HEADER = "x-kfloop-ignored"


@dataclass(frozen=True)
class Delivery:
    """One HTTP delivery of an event: the parsed CloudEvent, its data's content type and the raw body."""

    event: CloudEvent
    content_type: str
    body: bytes

    @property
    def key(self) -> str:
        """Equal for a redelivery of this event, different for another event with the same id."""
        return delivery_key(str(self.event["id"]), self.body)


@dataclass(frozen=True)
class EventReply:
    """How a service answers one event: 202 (accepted) or 204 (ignored), with headers saying why."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def ignored(cls, reason: str) -> "EventReply":
        return cls(204, {IGNORED_HEADER: reason})


class EventService(Protocol):
    """What an event app serves: one event at a time, its status, and a health line."""

    def handle(self, delivery: Delivery) -> EventReply:
        """Act on one event; raise a :class:`~kfloop.errors.KfloopError` to refuse it."""
        ...

    def refused(self, error: KfloopError) -> None:
        """Count an event that was refused (malformed or failed)."""
        ...

    def status(self) -> dict[str, Any]: ...

    def health(self) -> dict[str, str]: ...


def parse_cloudevent(headers: dict[str, str], body: bytes) -> CloudEvent:
    """The CloudEvent of one HTTP delivery (binary or structured mode), or an :class:`InputError`."""
    try:
        return from_http(headers, body)
    except GenericException as exc:
        raise InputError(f"not a CloudEvent: {exc}") from None


def error_response(exc: KfloopError) -> Response:
    answer = to_http(exc)
    return Response(orjson.dumps(answer.body), status_code=answer.status, headers=answer.headers, media_type="application/json")


def create_event_app(
    title: str,
    service: EventService,
    *,
    on_startup: Callable[[], Awaitable[None]] | None = None,
    on_shutdown: Callable[[], Awaitable[None]] | None = None,
    offload: bool = False,
) -> FastAPI:
    """The app: ``POST /`` events to ``service.handle``; ``GET /status``, ``/healthz``, ``/metrics``.

    With ``offload`` the handler runs in a worker thread, so a slow event
    (scoring, file I/O) never blocks the event loop and ``/healthz``.
    """

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if on_startup is not None:
            await on_startup()
        try:
            yield
        finally:
            if on_shutdown is not None:
                await on_shutdown()

    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    def handle(headers: dict[str, str], body: bytes) -> EventReply:
        event = parse_cloudevent(headers, body)
        return service.handle(Delivery(event, event.get("datacontenttype") or headers.get("content-type", ""), body))

    @app.post("/")
    async def receive(request: Request) -> Response:
        headers, body = dict(request.headers.items()), await request.body()
        try:
            if offload:
                reply = await asyncio.get_running_loop().run_in_executor(None, handle, headers, body)
            else:
                reply = handle(headers, body)
        except KfloopError as exc:
            service.refused(exc)
            return error_response(exc)
        return Response(status_code=reply.status, headers=reply.headers)

    @app.get("/status")
    async def status() -> dict[str, Any]:
        return service.status()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return service.health()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
