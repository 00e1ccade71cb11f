"""The CloudEvent app base that the watch and the trigger share: ``POST /`` events plus the service routes.

:func:`create_event_app` builds an :class:`EventApp` (plain ASGI) around an :class:`EventService`:
``POST /`` parses the delivery as a CloudEvent (:func:`parse_cloudevent`, binary or structured mode),
hands it to the service as a :class:`Delivery` and answers with the service's :class:`EventReply`,
which never carries a CloudEvent; ``GET /status``, ``/healthz`` and ``/metrics`` answer for the
service, and ``json_posts`` adds JSON ``POST`` routes. Every :class:`~kfloop.errors.KfloopError`
becomes an answer through :func:`kfloop.errors.to_http`. Used by :mod:`kfloop.serving.watch` (its
payload and dead-letter ports), :mod:`kfloop.serving.trigger` (the alarm intake) and
:mod:`kfloop.serving.feedback` (:class:`Delivery`). Parsing, credentials, replies and deferred
answers: ``docs/events.md``.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping, Protocol

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kfloop.errors import InputError, KfloopError, UnsupportedMediaType, to_http
from kfloop.serving.auth import Authenticator
from kfloop.serving.deliveries import delivery_key
from kfloop.serving.limits import DEFAULT_MAX_BODY_BYTES, read_limited_body

JsonPost = Callable[[Any], dict[str, Any]]  # a POST route's handler: the JSON body in, the JSON answer out

__all__ = [
    "IGNORED_HEADER",
    "Delivery",
    "EventApp",
    "JsonPost",
    "EventReply",
    "EventService",
    "ReceivedEvent",
    "create_event_app",
    "json_object",
    "parse_cloudevent",
]

IGNORED_HEADER = "x-kfloop-ignored"
REQUIRED_ATTRIBUTES = ("id", "source", "type")
ASGIReceive = Callable[[], Awaitable[dict[str, Any]]]
ASGISend = Callable[[dict[str, Any]], Awaitable[None]]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReceivedEvent:
    """A CloudEvent as received: its context attributes (``id``, ``type``, ``source``, extensions) and data."""

    attributes: dict[str, str]
    data: Any

    def __getitem__(self, name: str) -> str:
        return self.attributes[name]

    def get(self, name: str, default: str | None = None) -> str | None:
        return self.attributes.get(name, default)

    def get_data(self) -> Any:
        return self.data


@dataclass(frozen=True)
class Delivery:
    """One HTTP delivery of an event: the parsed CloudEvent, its data's content type and the raw body."""

    event: ReceivedEvent
    content_type: str
    body: bytes

    @property
    def key(self) -> str:
        """Equal for a redelivery of this event, different for another event with the same id."""
        return delivery_key(str(self.event["id"]), self.body)


@dataclass(frozen=True)
class EventReply:
    """How a service answers one event: 202 (accepted) or 204 (ignored), with headers saying why.

    ``wait``, when set, is work the answer waits for (on another thread): the reply is sent once it is
    done, and a :class:`~kfloop.errors.KfloopError` it raised is sent instead.
    """

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    wait: Future[Any] | None = field(default=None, compare=False)

    @classmethod
    def ignored(cls, reason: str) -> "EventReply":
        """204 with the reason in a header: printable ASCII, at most 300 characters (it may quote the event)."""
        printable = "".join(c if " " <= c <= "~" else "?" for c in reason)
        return cls(204, {IGNORED_HEADER: printable if len(printable) <= 300 else printable[:297] + "..."})


class EventService(Protocol):
    """What an event app serves: one event at a time, its status, and a health line."""

    def handle(self, delivery: Delivery) -> EventReply:
        """Act on one event; raise a :class:`~kfloop.errors.KfloopError` to refuse it."""
        ...

    def refused(self, error: KfloopError, event_type: str | None) -> None:
        """Count an event that was refused (malformed or failed): ``event_type`` is the type of the event the service
        (or the work its reply waited for) refused, None when it was refused before the service saw it (credentials,
        size, not a CloudEvent)."""
        ...

    def status(self) -> dict[str, Any]: ...

    def health(self) -> dict[str, str]: ...


def parse_cloudevent(headers: dict[str, str], body: bytes) -> ReceivedEvent:
    """The CloudEvent of one HTTP delivery (binary or structured mode), or an :class:`InputError`."""
    content_type = headers.get("content-type", "")
    if "ce-specversion" in headers:
        attributes = {name[3:]: value for name, value in headers.items() if name.startswith("ce-")}
        if content_type:
            attributes.setdefault("datacontenttype", content_type)
        _check_attributes(attributes)
        return ReceivedEvent(attributes, _json_or_bytes(body, content_type))
    if content_type.startswith("application/cloudevents+json"):
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InputError(f"not a CloudEvent: a structured event must be JSON ({exc})") from None
        if not isinstance(document, dict):
            raise InputError("not a CloudEvent: a structured event must be a JSON object")
        data = document.pop("data", None)
        attributes = {str(k): v if isinstance(v, str) else orjson.dumps(v).decode() for k, v in document.items()}
        _check_attributes(attributes)
        return ReceivedEvent(attributes, data)
    raise InputError("not a CloudEvent: send ce-* headers (binary mode) or application/cloudevents+json (structured mode)")


def _check_attributes(attributes: dict[str, str]) -> None:
    if attributes.get("specversion") != "1.0":
        raise InputError(f"not a CloudEvent: specversion must be 1.0, got {attributes.get('specversion')!r}")
    missing = [name for name in REQUIRED_ATTRIBUTES if not attributes.get(name)]
    if missing:
        raise InputError(f"not a CloudEvent: missing required attribute(s) {', '.join(missing)}")


def _json_or_bytes(body: bytes, content_type: str) -> Any:
    if not body:
        return None
    if "json" in content_type:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            return body  # the service says what it thinks of data that is not JSON
    return body


def json_object(data: Any, what: str) -> dict[str, Any]:
    """An event's data as a JSON object (binary-mode events may come without a JSON content type), or an InputError."""
    if isinstance(data, (bytes, bytearray, str)):
        try:
            data = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise InputError(f"{what} must be a JSON object") from None
    if not isinstance(data, dict):
        raise InputError(f"{what} must be a JSON object")
    return data


def error_body(exc: KfloopError) -> tuple[int, bytes, dict[str, str]]:
    answer = to_http(exc)
    return answer.status, orjson.dumps(answer.body), answer.headers


class _Refusal(Exception):
    """A service's refusal of an event it was handed, with the event's type: what ``refused`` counts it by."""

    def __init__(self, error: KfloopError, event_type: str) -> None:
        super().__init__(str(error))
        self.error, self.event_type = error, event_type


class EventApp:
    """The ASGI app :func:`create_event_app` returns."""

    def __init__(self, title: str, service: EventService, *, on_startup: Callable[[], Awaitable[None]] | None,
                 on_shutdown: Callable[[], Awaitable[None]] | None, offload: bool, max_body_bytes: int,
                 authenticator: Authenticator | None, json_posts: Mapping[str, JsonPost] | None = None) -> None:
        self.title, self.service, self.max_body_bytes = title, service, max_body_bytes
        self.authenticator = authenticator
        self.json_posts = dict(json_posts or {})
        self.on_startup, self.on_shutdown, self.offload = on_startup, on_shutdown, offload

    async def __call__(self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if path == "/" and method == "POST":
            await self._event(scope, receive, send)
        elif method == "POST" and path in self.json_posts:
            await self._json_post(self.json_posts[path], scope, receive, send)
        elif method in ("GET", "HEAD") and path == "/healthz":
            await _reply(send, 200, orjson.dumps(self.service.health()))
        elif method in ("GET", "HEAD") and path == "/status":
            await _reply(send, 200, orjson.dumps(self.service.status(), option=orjson.OPT_SERIALIZE_NUMPY, default=str))
        elif method in ("GET", "HEAD") and path == "/metrics":
            await _reply(send, 200, generate_latest(), content_type=CONTENT_TYPE_LATEST)
        else:
            await _reply(send, 404, orjson.dumps({"error": f"{self.title}: no route {method} {path}; "
                                                           "try POST /, GET /status, /healthz, /metrics"}))

    async def _event(self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        try:
            if self.authenticator is not None:
                self.authenticator.check(headers)
            body = await read_limited_body(scope, receive, self.max_body_bytes)
            if self.offload:
                event_type, reply = await asyncio.get_running_loop().run_in_executor(None, self._handle, headers, body)
            else:
                event_type, reply = self._handle(headers, body)
            if reply.wait is not None:
                try:
                    await asyncio.wrap_future(reply.wait)
                except KfloopError as exc:
                    raise _Refusal(exc, event_type) from exc
        except _Refusal as refusal:
            await self._refuse(send, refusal.error, refusal.event_type)
            return
        except KfloopError as exc:
            await self._refuse(send, exc, None)
            return
        await _reply(send, reply.status, b"", headers=reply.headers, content_type=None)

    async def _refuse(self, send: ASGISend, error: KfloopError, event_type: str | None) -> None:
        self.service.refused(error, event_type)
        status, content, extra = error_body(error)
        await _reply(send, status, content, headers=extra)

    async def _json_post(self, handler: JsonPost, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        """A JSON request beside the events: the same credentials and body limit; the handler runs in a worker thread."""
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        try:
            if self.authenticator is not None:
                self.authenticator.check(headers)
            content_type = headers.get("content-type", "").split(";")[0].strip()
            if content_type != "application/json":
                raise UnsupportedMediaType(f"send the body as application/json, not {content_type or 'nothing'!r}")
            body = await read_limited_body(scope, receive, self.max_body_bytes)
            try:
                document = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise InputError(f"the body is not JSON: {exc}") from None
            answer = await asyncio.get_running_loop().run_in_executor(None, handler, document)
        except KfloopError as exc:
            status, content, extra = error_body(exc)
            await _reply(send, status, content, headers=extra)
            return
        await _reply(send, 200, orjson.dumps(answer))

    def _handle(self, headers: dict[str, str], body: bytes) -> tuple[str, EventReply]:
        """The delivery's event type and the service's reply; the service's refusal as a :class:`_Refusal`."""
        event = parse_cloudevent(headers, body)
        event_type = str(event["type"])
        try:
            return event_type, self.service.handle(Delivery(event, event.get("datacontenttype") or headers.get("content-type", ""), body))
        except KfloopError as exc:
            raise _Refusal(exc, event_type) from exc

    async def _lifespan(self, receive: ASGIReceive, send: ASGISend) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if self.on_startup is not None:
                    await self.on_startup()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.on_shutdown is not None:
                    await self.on_shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _reply(send: ASGISend, status: int, content: bytes, *, headers: dict[str, str] | None = None,
                 content_type: str | None = "application/json") -> None:
    raw = [(b"content-length", str(len(content)).encode())]
    if content_type is not None:
        raw.append((b"content-type", content_type.encode()))
    raw += [(name.encode("latin-1"), value.encode("latin-1", "replace")) for name, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": content})


def create_event_app(
    title: str,
    service: EventService,
    *,
    on_startup: Callable[[], Awaitable[None]] | None = None,
    on_shutdown: Callable[[], Awaitable[None]] | None = None,
    offload: bool = False,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    authenticator: Authenticator | None,
    json_posts: Mapping[str, JsonPost] | None = None,
) -> EventApp:
    """The app: ``POST /`` events to ``service.handle``; ``GET /status``, ``/healthz``, ``/metrics``.

    With ``offload`` the handler runs in a worker thread, so a slow event
    (file I/O) never blocks the event loop and ``/healthz``. A body over
    ``max_body_bytes`` gets 413 before it is read whole. ``authenticator``
    guards ``POST /``; ``None`` is a deliberate choice (a cluster's watch,
    where a NetworkPolicy admits only the transformer's pods). ``json_posts``
    maps further ``POST`` paths to handlers of a JSON body (the watch's label
    intake): the same ``authenticator`` and body limit, ``application/json``
    only (415), the handler's answer as a 200 JSON body.
    """
    return EventApp(title, service, on_startup=on_startup, on_shutdown=on_shutdown, offload=offload,
                    max_body_bytes=max_body_bytes, authenticator=authenticator, json_posts=json_posts)
