"""The local authenticator and RequireCredentials directly, in process: the right token through a loopback Host
passes, everything else is 401 or 403 in the error format before the app runs; unprotected paths pass."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from kfloop.errors import Forbidden, Unauthenticated
from kfloop.serving.auth import LocalToken, RequireCredentials, inference_path, is_loopback

TOKEN = "s3cret-token-of-the-home"


@pytest.mark.parametrize("host, loopback", [("localhost", True), ("127.0.0.1", True), ("127.0.0.2", True), ("[::1]", True),
                                            ("127.evil.example", False), ("example.org", False), ("", False)])
def test_loopback_names(host, loopback):
    assert is_loopback(host) is loopback


@pytest.mark.parametrize("headers, error, message", [
    ({"host": "127.0.0.1:8080"}, Unauthenticated, "this endpoint needs credentials"),
    ({"host": "127.0.0.1:8080", "authorization": "Basic dXNlcjpwdw=="}, Unauthenticated, "must be 'Bearer <token>'"),
    ({"host": "127.0.0.1:8080", "authorization": "Bearer nope"}, Forbidden, "wrong token"),
    ({"host": "rebound.example:8080", "authorization": f"Bearer {TOKEN}"}, Forbidden, "is not a loopback name"),
])
def test_local_token_refusals(headers, error, message):
    with pytest.raises(error, match=message):
        LocalToken(TOKEN).check(headers)


def test_local_token_passes_the_right_token_through_loopback_and_any_host_when_told():
    LocalToken(TOKEN).check({"host": "[::1]:9000", "authorization": f"Bearer {TOKEN}"})
    LocalToken(TOKEN, loopback_only=False).check({"host": "watch.ns.svc", "authorization": f"Bearer {TOKEN}"})


def test_inference_paths():
    assert all(map(inference_path, ["/v1/models/m:predict", "/v2/models/m/infer", "/v2/models/m/versions/2/infer"]))
    assert not any(map(inference_path, ["/v2/health/ready", "/metrics", "/v2/models/m"]))


async def app(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ran"})


def call(path: str, headers: dict[str, str]) -> httpx.Response:
    async def run() -> httpx.Response:
        guarded = RequireCredentials(app, authenticator=LocalToken(TOKEN), protects=inference_path)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guarded), base_url="http://127.0.0.1") as client:
            return await client.post(path, headers=headers, content=b"{}")

    return asyncio.run(run())


def test_require_credentials_answers_before_the_app_runs():
    refused = call("/v2/models/m/infer", {})
    assert refused.status_code == 401 and refused.text != "ran" and "needs credentials" in refused.json()["error"]
    assert call("/v2/models/m/infer", {"authorization": "Bearer nope"}).status_code == 403
    assert call("/v2/models/m/infer", {"authorization": f"Bearer {TOKEN}"}).text == "ran"
    assert call("/v2/health/ready", {}).text == "ran"
