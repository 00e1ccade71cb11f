"""The local serving runtime (transformer + predictor replicas as supervised processes): scaling, version
switches and canaries under load fail no request, a crashed replica is restarted, a restarted transformer
serves the current split from its first answer, a change while it is down is undone and answered 503, the
restart back-off starts over after a stable run, and ``kfloop serve`` stops every process it started."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import httpx
import pytest

from testbed import tensor, v1, v2, wait_until_answering
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


def test_a_shadow_version_gets_a_copy_of_every_request_off_the_request_path_and_no_client_sees_its_answers(stack):
    runtime, sink = stack["runtime"], stack["sink"]
    runtime.set_traffic({"1": 100.0}, mirror="2")
    try:
        assert [(s["version"], s["weight"], s["mirror"]) for s in runtime.status()["traffic"]] == [("1", 100.0, False), ("2", 0.0, True)]
        rows = stack["holdout"].holdout_features[:12]
        answers = [v2(stack, tensor(rows[i:i + 1])) for i in range(12)]
        assert {(a.status_code, a.json()["model_version"]) for a in answers} == {(200, "1")}
        ids = {a.headers["x-request-id"] for a in answers}

        def shadow_answers() -> list:
            return [e for e in list(sink.events) if e["id"] in ids and e.get("shadow") == "true"]
        deadline = time.time() + 15
        while len(shadow_answers()) < 12 and time.time() < deadline:
            time.sleep(0.1)
        shadows = shadow_answers()
        assert len(shadows) == 12 and {e["modelversion"] for e in shadows} == {"2"}
        assert all(e["type"] == "org.kubeflow.serving.inference.response" for e in shadows)
        assert all(len(e.data["outputs"][0]["data"]) == 1 for e in shadows)  # its own answer, in the watch's format
        served = {e["id"]: e for e in list(sink.events) if e["id"] in ids and e["type"].endswith("response") and "shadow" not in e.get_attributes()}
        assert set(served) == ids and {e["modelversion"] for e in served.values()} == {"1"}
        with pytest.raises(Exception, match="cannot be both a shadow"):
            runtime.set_traffic({"1": 50.0, "2": 50.0}, mirror="2")
    finally:
        runtime.set_traffic({"1": 100.0})
    assert [s["version"] for s in runtime.status()["traffic"]] == ["1"]  # the shadow's replica is stopped


def test_a_transformer_killed_mid_canary_answers_every_request_from_its_restart_on_with_the_current_split(stack):
    runtime = stack["runtime"]
    runtime.scale(1)
    runtime.switch_version("2")
    runtime.set_traffic({"2": 50, "1": 50})  # version 1 now on a replica the transformer was not started with
    try:
        argv = runtime.transformer.argv
        start_up_route = set(argv[argv.index("--predictor-host") + 1].split(","))
        live = {r["address"] for s in runtime.status()["traffic"] for r in s["replicas"]}
        assert not start_up_route & live, "the start-up route should name only stopped replicas"
        restarts = runtime.status()["transformer"]["restarts"]

        kill_transformer(runtime)
        answers = answers_from_the_restart_on(stack)

        assert answers and {status for status, _ in answers} == {200}, answers
        assert {version for _, version in answers} == {"1", "2"}
        routes = httpx.get(f"http://127.0.0.1:{runtime.transformer_control_port}/kfloop/routes",
                           headers=bearer(local_token(runtime.home))).json()["routes"]
        assert {(r["version"], r["weight"], frozenset(r["upstreams"])) for r in routes} == \
            {(s["version"], s["weight"], frozenset(r["address"] for r in s["replicas"])) for s in runtime.status()["traffic"]}
        assert runtime.status()["transformer"]["restarts"] == restarts + 1
    finally:
        wait_until_answering(runtime.transformer.ready_url, "the transformer")
        runtime.switch_version("1")


@pytest.fixture
def admin(stack):
    """An admin API in front of the shared runtime; afterwards, the transformer ready and version 1 serving again."""
    from kfloop.local.admin import AdminServer

    runtime = stack["runtime"]
    server = AdminServer(runtime, free_port())
    server.start()
    yield server
    server.stop()
    wait_until_answering(runtime.transformer.ready_url, "the transformer")
    runtime.switch_version("1")


def test_a_traffic_change_while_the_transformer_is_down_answers_503_and_leaves_no_process_outside_status(stack, admin):
    runtime = stack["runtime"]
    before = shares(runtime.status())
    kill_transformer(runtime)  # its restart waits at least 0.5 s: the change below comes first
    answer = httpx.post(admin.url + "/traffic", json={"weights": {"1": 50, "2": 50}}, timeout=120,
                        headers=bearer(local_token(runtime.home)))

    assert answer.status_code == 503, answer.text
    assert "try again" in answer.json()["error"]
    status = runtime.status()
    assert shares(status) == before
    in_status = {r["pid"] for s in status["traffic"] for r in s["replicas"]}
    assert running_predictors(stack["registry"].root) == in_status  # the version-2 replica it started is stopped
    assert all(os.kill(pid, 0) is None for pid in in_status)
    # The restarted transformer took the old split from the routes file: no request reaches the stopped replica.
    answers = answers_from_the_restart_on(stack)
    assert answers and set(answers) == {(200, "1")}, answers


def test_a_traffic_change_while_the_transformer_restarts_waits_for_it_and_succeeds(stack, admin):
    runtime = stack["runtime"]
    victim = kill_transformer(runtime)
    deadline = time.monotonic() + 30
    while runtime.transformer.pid == victim and time.monotonic() < deadline:  # respawned, not yet ready
        time.sleep(0.02)
    answer = httpx.post(admin.url + "/traffic", json={"weights": {"1": 50, "2": 50}}, timeout=120,
                        headers=bearer(local_token(runtime.home)))

    assert answer.status_code == 200, answer.text
    assert sorted((s["version"], s["weight"]) for s in answer.json()["traffic"]) == [("1", 50.0), ("2", 50.0)]
    answers = [(response.status_code, response.json().get("model_version"))
               for response in (v2(stack, tensor(stack["holdout"].holdout_features[:1])) for _ in range(40))]
    assert {status for status, _ in answers} == {200} and {version for _, version in answers} == {"1", "2"}
    in_status = {r["pid"] for s in runtime.status()["traffic"] for r in s["replicas"]}
    assert running_predictors(stack["registry"].root) == in_status


def test_the_restart_back_off_grows_with_restarts_in_a_row_and_starts_over_after_a_stable_run(tmp_path):
    from kfloop.local.supervisor import STABLE_UPTIME, ManagedProcess, restart_delay

    assert [restart_delay(n) for n in range(7)] == [0.5, 1.0, 2.0, 5.0, 10.0, 10.0, 10.0]
    process = ManagedProcess("exits at once", [sys.executable, "-c", ""], "http://127.0.0.1:9/", tmp_path / "exits.log")
    process.spawn()
    delays = []
    for _ in range(6):
        process.process.wait(30)
        delays.append(process.exited())
        process.respawn()
    process.process.wait(30)
    assert delays == [0.5, 1.0, 2.0, 5.0, 10.0, 10.0]
    process.started -= STABLE_UPTIME  # this run lasted STABLE_UPTIME before it exited
    assert process.exited() == 0.5
    assert (process.restarts, process.restarts_in_a_row) == (6, 0)
    process.respawn()
    process.process.wait(30)
    assert process.exited() == 1.0  # it exited again at once: the second restart of a new row
    assert process.restarts == 7


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


def test_a_runtime_whose_transformer_cannot_start_stops_the_replicas_it_started(stack, tmp_path):
    import socket

    from kfloop.errors import UpstreamError
    from kfloop.local.runtime import ServingRuntime

    home = tmp_path / "home"
    with socket.socket() as taken:  # the transformer's port is someone else's: it cannot bind and exits
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        runtime = ServingRuntime(str(stack["root"] / "registry"), "leaf", home=home, replicas=2,
                                 http_port=taken.getsockname()[1], grpc_port=free_port(), log_dir=tmp_path / "logs")
        with pytest.raises(UpstreamError, match="transformer"):
            runtime.start()
    assert len(list((tmp_path / "logs").glob("predictor-leaf-*.log"))) == 2  # both replicas had started
    assert _processes_naming(str(home)) == []


def _processes_naming(text: str) -> list[int]:
    """PIDs of live processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_admin_calls_need_the_home_token_are_bounded_json_and_name_registry_versions_only(stack):
    from kfloop.local.admin import AdminServer

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


def shares(status: dict) -> list[tuple[str, float, list[str]]]:
    return [(s["version"], s["weight"], [r["address"] for r in s["replicas"]]) for s in status["traffic"]]


def kill_transformer(runtime) -> int:
    """SIGKILL the runtime's transformer and wait until it is gone (its ports closed); its PID."""
    pid = runtime.transformer.pid
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not gone(pid):
        time.sleep(0.01)
    return pid


def gone(pid: int) -> bool:
    try:
        return "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return True


def running_predictors(registry_root: str) -> set[int]:
    """PIDs of the live predictor processes serving from ``registry_root`` (os.kill(pid, 0) succeeds, no zombie)."""
    root, pids = str(Path(registry_root).resolve()), set()
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().decode().split("\0") if entry.name.isdigit() else []
        except OSError:
            continue
        if "predictor" in argv and any(arg.startswith(root) for arg in argv) and not gone(int(entry.name)):
            try:
                os.kill(int(entry.name), 0)
            except ProcessLookupError:
                continue
            pids.add(int(entry.name))
    return pids


def answers_from_the_restart_on(stack, seconds: float = 1.0) -> list[tuple[int, str | None]]:
    """Send V2 requests one after another while the transformer is down and for ``seconds`` after its first answer:
    the status and version of every request it answered (those it could not take while down are left out)."""
    body = tensor(stack["holdout"].holdout_features[:1])
    answers: list[tuple[int, str | None]] = []
    first = None
    deadline = time.monotonic() + 60
    with httpx.Client(timeout=10) as client:
        while time.monotonic() < (deadline if first is None else first + seconds):
            try:
                answer = client.post(stack["runtime"].endpoints["v2"], json=body)
            except httpx.TransportError:
                time.sleep(0.005)
                continue
            first = first or time.monotonic()
            answers.append((answer.status_code, answer.json().get("model_version") if answer.status_code == 200 else answer.text[:200]))
    return answers
