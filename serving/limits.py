"""Request body limits: every kfloop HTTP server refuses an over-size body with 413 before reading it whole.

:func:`read_limited_body` reads an ASGI request body up to ``limit`` bytes: a
``Content-Length`` over the limit is refused before a byte is read, and a
body sent without one is refused as soon as it passes the limit, so a client
cannot make a server buffer (and parse) gigabytes. :class:`BodyLimit` is the
same rule as ASGI middleware, for apps that read the body themselves (the
KServe ModelServer's): a body that declares a length within the limit passes
untouched, and only a body without one is read here, counted and replayed.

Headers come before any of that: uvicorn's HTTP parser buffers a request's
header section whole before the app sees it, whatever its size (docs/security.md
has what a 64 MB header cost). :class:`HeaderLimitedHttp` is uvicorn's
httptools protocol with a bound on the header section: past
:data:`MAX_HEADER_BYTES` the answer is 431 and the connection is closed. Every
kfloop server runs with it (``http=HeaderLimitedHttp``).
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from kfloop.errors import PayloadTooLarge, to_http

__all__ = ["DEFAULT_MAX_BODY_BYTES", "MAX_HEADER_BYTES", "BodyLimit", "HeaderLimitedHttp", "read_limited_body"]

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024  # a full batch (1024 rows x 192 features) as V1 JSON is about 4 MiB
MAX_HEADER_BYTES = 64 * 1024  # request line + headers; CloudEvents' ce-* attributes are a few hundred bytes

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


class HeaderLimitedHttp(HttpToolsProtocol):
    """uvicorn's httptools protocol, answering 431 once a request's header section passes :data:`MAX_HEADER_BYTES`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_bytes = 0  # bytes received since the last request's headers were complete
        self._in_body = False

    def on_headers_complete(self) -> None:
        self._in_body = True
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_body, self._header_bytes = False, 0
        super().on_message_complete()

    def data_received(self, data: bytes) -> None:
        if not self._in_body:
            self._header_bytes += len(data)
        super().data_received(data)
        if not self._in_body and self._header_bytes > MAX_HEADER_BYTES and not self.transport.is_closing():
            body = b"request headers are over the limit of %d bytes" % MAX_HEADER_BYTES
            self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
            self.transport.close()
