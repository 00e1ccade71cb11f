"""Sending the pipeline to Kubeflow Pipelines: the token never goes over plain http unless that is asked for."""

from __future__ import annotations

import http.server
import threading

import pytest

from kfloop.errors import InputError
from kfloop.pipelines.cluster import KfpEndpoint

REFUSAL = ("refusing to send the Kubeflow Pipelines token over plain http to {host}: use https, "
           "or pass --kfp-allow-http (allow_plain_http) if this is a trusted in-cluster address")


@pytest.mark.parametrize("host", ["http://ml-pipeline.kubeflow.svc.cluster.local:8888", "HTTP://127.0.0.1:8888"])
def test_a_token_for_an_http_host_is_refused_naming_the_flag(host):
    with pytest.raises(InputError) as caught:
        KfpEndpoint(host, token="secret")
    assert str(caught.value) == REFUSAL.format(host=host)
    assert "secret" not in str(caught.value)


def test_plain_http_carries_a_token_only_when_allowed_and_https_or_no_token_need_nothing():
    assert KfpEndpoint("http://ml-pipeline.kubeflow.svc.cluster.local:8888", token="t", allow_plain_http=True).token == "t"
    assert KfpEndpoint("https://kubeflow.example.org/pipeline", token="t").token == "t"
    assert KfpEndpoint("http://ml-pipeline.kubeflow.svc.cluster.local:8888").token is None  # a single-user KFP: no token


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[str]  # one list per server: set on the subclass the fixture makes

    def do_GET(self) -> None:
        self.seen.append(str(self.headers.get("Authorization")))
        self.send_response(401)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def kfp_api():
    """A stand-in Kubeflow Pipelines API on loopback (plain http) that records each Authorization header."""
    handler = type("Recorder", (_Recorder,), {"seen": []})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", handler.seen
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_kfloop_submit_sends_no_token_over_http_without_the_flag(kfloop_cli, kfp_api):
    host, seen = kfp_api
    refused = kfloop_cli("submit", "--host", host, "--token", "secret", "--registry", "s3://b/r")
    assert refused.code == 1
    assert refused.stderr.strip().splitlines() == ["error: " + REFUSAL.format(host=host)]
    assert seen == []  # nothing left the process
    allowed = kfloop_cli("submit", "--host", host, "--token", "secret", "--registry", "s3://b/r", "--kfp-allow-http")
    assert allowed.code == 1  # the stand-in refuses every token
    assert f"error: Kubeflow Pipelines at {host} refused the credentials (HTTP 401)" in allowed.stderr
    assert seen == ["Bearer secret"]
