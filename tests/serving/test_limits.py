"""BodyLimit directly, in process: a body over the limit is 413 in kfloop's error format whether its length is
declared or streamed; a body within it reaches the app byte for byte; GETs pass untouched."""

from __future__ import annotations

import asyncio

import httpx

from kfloop.serving.limits import BodyLimit


async def echo(scope, receive, send) -> None:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/octet-stream")]})
    await send({"type": "http.response.body", "body": body})


def call(method: str, content=None, headers=None) -> httpx.Response:
    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=BodyLimit(echo, limit=1000))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, "/", content=content, headers=headers)

    return asyncio.run(run())


def chunks(total: int):
    async def stream():
        for _ in range(total // 100):
            yield b"x" * 100
    return stream()


def test_a_body_within_the_limit_reaches_the_app_whole():
    assert call("POST", b"y" * 1000).content == b"y" * 1000
    assert call("POST", chunks(900)).content == b"x" * 900


def test_a_declared_body_over_the_limit_is_413_in_the_error_format():
    answer = call("POST", b"y" * 1001)
    assert answer.status_code == 413
    assert answer.json() == {"error": "request body of 1001 bytes is over the limit of 1000 bytes"}


def test_a_streamed_body_over_the_limit_is_413_once_it_passes_the_limit():
    answer = call("POST", chunks(5000))
    assert answer.status_code == 413 and answer.json() == {"error": "request body is over the limit of 1000 bytes"}
    assert answer.headers["connection"] == "close"


def test_gets_pass_untouched():
    assert call("GET").status_code == 200
