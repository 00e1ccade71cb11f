"""Request body limits: every kfloop HTTP server refuses an over-size body with 413 before reading it whole.

:func:`read_limited_body` reads an ASGI request body up to ``limit`` bytes: a
``Content-Length`` over the limit is refused before a byte is read, and a
body sent without one is refused as soon as it passes the limit, so a client
cannot make a server buffer (and parse) gigabytes. :class:`BodyLimit` is the
same rule as ASGI middleware, for apps that read the body themselves (the
KServe ModelServer's): a body that declares a length within the limit passes
untouched, and only a body without one is read here, counted and replayed.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import orjson

from kfloop.errors import PayloadTooLarge, to_http

__all__ = ["DEFAULT_MAX_BODY_BYTES", "BodyLimit", "read_limited_body"]

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024  # a full batch (1024 rows x 192 features) as V1 JSON is about 4 MiB

ASGIReceive = Callable[[], Awaitable[dict[str, Any]]]
ASGISend = Callable[[dict[str, Any]], Awaitable[None]]


def _declared_length(scope: dict[str, Any]) -> int | None:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def read_limited_body(scope: dict[str, Any], receive: ASGIReceive, limit: int) -> bytes:
    """The request body, or :class:`~kfloop.errors.PayloadTooLarge` once it is known to exceed ``limit``."""
    declared = _declared_length(scope)
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes is over the limit of {limit} bytes")
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


class BodyLimit:
    """ASGI middleware: bodies over ``limit`` bytes get 413 ``{"error": ...}``; others reach the app as sent."""

    def __init__(self, app: Any, limit: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        declared = _declared_length(scope) if scope["type"] == "http" else None
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD") or (declared is not None and declared <= self.limit):
            await self.app(scope, receive, send)  # the server reads no more than a declared length: nothing to count
            return
        try:
            body = await read_limited_body(scope, receive, self.limit)
        except PayloadTooLarge as exc:
            answer = to_http(exc)
            content = orjson.dumps(answer.body)
            await send({"type": "http.response.start", "status": answer.status,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode()),
                                    (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": content})
            return
        delivered = False

        async def replay() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnect messages

        await self.app(scope, replay, send)
