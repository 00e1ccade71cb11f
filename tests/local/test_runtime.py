"""The local serving runtime (transformer + predictor replicas as supervised processes): scaling, version
switches and canaries under load fail no request, a crashed replica is restarted, and ``kfloop serve``
stops every process it started."""

from __future__ import annotations

import asyncio
import functools
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import httpx
import pytest

from testbed import tensor, v1
from kfloop.credentials import bearer, local_token
from kfloop.local.supervisor import free_port

pytestmark = pytest.mark.slow


def test_scaling_switching_and_canary_under_load_fail_no_request(stack):
    runtime = stack["runtime"]
    body = json.dumps(tensor(stack["holdout"].holdout_features[:1])).encode()
    outcomes: dict = {"ok": 0, "failed": []}
    versions_seen = set()

    async def load(seconds: float) -> None:
        async with aiohttp.ClientSession() as session:
            end = time.monotonic() + seconds

            async def worker() -> None:
                while time.monotonic() < end:
                    async with session.post(runtime.endpoints["v2"], data=body, headers={"content-type": "application/json"}) as answer:
                        text = await answer.read()
                        if answer.status == 200:
                            outcomes["ok"] += 1
                            versions_seen.add(json.loads(text)["model_version"])
                        else:
                            outcomes["failed"].append((answer.status, text[:200]))

            await asyncio.gather(*[worker() for _ in range(8)])

    loader = threading.Thread(target=asyncio.run, args=(load(16),))
    loader.start()
    time.sleep(1.5)
    runtime.switch_version("2")
    runtime.scale(3)
    runtime.set_traffic({"2": 70, "1": 30})
    runtime.scale(1)
    runtime.switch_version("1")
    loader.join()
    assert outcomes["failed"] == []
    assert outcomes["ok"] > 1000
    assert versions_seen == {"1", "2"}
    # The canary share of version 1 started with as many replicas as version 2 had then (3).
    assert runtime.version == "1" and runtime.replica_count() == 3


def test_a_crashed_replica_is_restarted_and_requests_keep_succeeding(stack):
    runtime = stack["runtime"]
    runtime.scale(2)
    victim = runtime.status()["traffic"][0]["replicas"][0]
    subprocess.run(["kill", "-9", str(victim["pid"])], check=True)
    for _ in range(30):
        assert v1(stack, {"instances": stack["holdout"].holdout_features[:1].tolist()}).status_code == 200
    deadline = time.time() + 30
    while time.time() < deadline:
        replica = runtime.status()["traffic"][0]["replicas"][0]
        if replica["restarts"] == 1 and replica["alive"] and replica["pid"] != victim["pid"]:
            break
        time.sleep(0.2)
    assert (replica["restarts"], replica["alive"]) == (1, True)


def test_kfloop_serve_with_inference_credentials_stops_every_process_it_started_on_sigterm(stack, tmp_path):
    registry = stack["registry"]
    http_port, grpc_port, admin_port = free_port(), free_port(), free_port()
    client_token = tmp_path / "client-token"
    client_token.write_text("client-secret\n")
    serve = subprocess.Popen(
        [sys.executable, "-m", "kfloop", "serve", "--registry", registry.root, "--model", "leaf", "--replicas", "2",
         "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--admin-port", str(admin_port), "--home", str(tmp_path),
         "--auth-token-file", str(client_token)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.time() + 90
        status = None
        while time.time() < deadline:
            try:
                status = httpx.get(f"http://127.0.0.1:{admin_port}/status").json()
                break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert status is not None, serve.stdout.read() if serve.poll() is not None else "not up"
        pids = [status["transformer"]["pid"]] + [r["pid"] for s in status["traffic"] for r in s["replicas"]]
        assert len(pids) == 3
        predict = functools.partial(httpx.post, f"http://127.0.0.1:{http_port}/v1/models/leaf:predict",
                                    json={"instances": stack["holdout"].holdout_features[:1].tolist()})
        assert predict().status_code == 401
        assert predict(headers={"authorization": "Bearer wrong"}).status_code == 403
        assert predict(headers=bearer("client-secret")).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{http_port}/v2/models/leaf/ready").status_code == 200  # health stays open
        assert grpc_infer_status(f"127.0.0.1:{grpc_port}", stack["holdout"].holdout_features[:1], None) == "UNAUTHENTICATED"
        assert grpc_infer_status(f"127.0.0.1:{grpc_port}", stack["holdout"].holdout_features[:1], "client-secret") == "OK"
        # The call returns once the new replica is ready: seconds on a busy machine.
        scaled = httpx.post(f"http://127.0.0.1:{admin_port}/replicas", json={"replicas": 3}, timeout=120,
                            headers=bearer(local_token(tmp_path))).json()
        assert scaled == {"replicas": 3}
        pids += [r["pid"] for s in httpx.get(f"http://127.0.0.1:{admin_port}/status").json()["traffic"] for r in s["replicas"]]
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(60)
    assert serve.returncode == 0
    alive = [pid for pid in set(pids) if Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()]
    assert alive == []


def test_admin_calls_need_the_home_token_are_bounded_json_and_name_registry_versions_only(stack):
    from kfloop.local.runtime import AdminServer

    runtime = stack["runtime"]
    admin = AdminServer(runtime, free_port())
    admin.start()
    auth = bearer(local_token(runtime.home))
    try:
        before = runtime.status()
        for path, body in (("/replicas", {"replicas": 2}), ("/version", {"version": "2"}), ("/traffic", {"weights": {"2": 100}})):
            anonymous = httpx.post(admin.url + path, json=body)
            assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"].startswith("Bearer"), path
            assert httpx.post(admin.url + path, json=body, headers={"authorization": "Bearer guessed"}).status_code == 403
            rebound = httpx.post(admin.url + path, json=body, headers=auth | {"host": "evil.example"})
            assert rebound.status_code == 403 and "loopback" in rebound.json()["error"]
        # A web page's cross-site form post carries no token: refused before its content type even matters.
        assert httpx.post(admin.url + "/replicas", content=b"replicas=50", headers={"content-type": "text/plain"}).status_code == 401
        assert httpx.get(admin.url + "/status").status_code == 200  # reading stays open
        post = functools.partial(httpx.post, headers=auth)
        too_many = post(admin.url + "/replicas", json={"replicas": runtime.max_replicas + 1})
        assert too_many.status_code == 400 and f"between 1 and {runtime.max_replicas}" in too_many.json()["error"]
        as_form = httpx.post(admin.url + "/replicas", content=b"replicas=50",
                             headers=auth | {"content-type": "application/x-www-form-urlencoded"})
        assert as_form.status_code == 415
        as_text = httpx.post(admin.url + "/traffic", content=b'{"weights": {"1": 100}}', headers=auth | {"content-type": "text/plain"})
        assert as_text.status_code == 415
        for version in ("../other/1", "x"):
            answer = post(admin.url + "/version", json={"version": version})
            assert answer.status_code == 400 and "not a registry version" in answer.json()["error"], version
            answer = post(admin.url + "/traffic", json={"weights": {version: 100}})
            assert answer.status_code == 400 and "not a registry version" in answer.json()["error"], version
        assert post(admin.url + "/version", json={"version": "99"}).status_code == 404  # digits, but no such version
        for weights in (b'{"weights": {"1": NaN}}', b'{"weights": {"1": 1e999}}', b'{"weights": {"1": 101}}', b'{"weights": [1]}'):
            answer = post(admin.url + "/traffic", content=weights, headers=auth | {"content-type": "application/json"})
            assert answer.status_code == 400, (weights, answer.text)
        for replicas in (True, 2.5, "3", 0):
            assert post(admin.url + "/replicas", json={"replicas": replicas}).status_code == 400, replicas
        assert post(admin.url + "/replicas", json={}).status_code == 400
        assert post(admin.url + "/replicas", content=b"{nope", headers=auth | {"content-type": "application/json"}).status_code == 400
        huge = httpx.post(admin.url + "/traffic", content=b"{" + b" " * (1024 * 1024) + b"}",
                          headers=auth | {"content-type": "application/json"})
        assert huge.status_code == 413
        after = runtime.status()
        assert [(s["version"], s["weight"], len(s["replicas"])) for s in after["traffic"]] == \
            [(s["version"], s["weight"], len(s["replicas"])) for s in before["traffic"]]
    finally:
        admin.stop()


def grpc_infer_status(address: str, rows, token: str | None) -> str:
    """The gRPC status code name of one V2 ModelInfer call, with ``authorization`` metadata when ``token`` is given."""
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

    request = pb.ModelInferRequest(model_name="leaf", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="features", datatype="FP32", shape=list(rows.shape), contents=pb.InferTensorContents(fp32_contents=rows.ravel().tolist()))])
    with grpc.insecure_channel(address) as channel:
        try:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                request, metadata=[("authorization", f"Bearer {token}")] if token else None, timeout=30)
        except grpc.RpcError as exc:
            return exc.code().name
    return "OK"
