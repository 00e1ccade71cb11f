"""Real KServe servers on loopback (transformer + 2 predictor replicas under the local runtime),
called with real HTTP and gRPC clients; payload CloudEvents caught by a real HTTP sink."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import httpx
import jsonschema
import numpy as np
import pytest
import yaml

from conftest import EventSink, register_version
from kfloop.registry import ModelRegistry
from kfloop.serving.runtime import ServingRuntime, free_port
from kfloop.training import Prepared

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory, serving_data):
    """Registry with versions 1 (production) and 2 of model 'leaf', served by a runtime with 2 replicas."""
    root = tmp_path_factory.mktemp("serving")
    registry = root / "registry"
    register_version(registry, "leaf", serving_data, n_estimators=60, work=root / "v1")
    register_version(registry, "leaf", serving_data, n_estimators=30, work=root / "v2", promote=False)
    sink = EventSink()
    runtime = ServingRuntime(
        str(registry), "leaf", replicas=2, http_port=free_port(), grpc_port=free_port(),
        logger_url=sink.url, log_dir=root / "logs",
    )
    runtime.start()
    prepared = Prepared.load(str(root / "v1" / "prepared.npz"))
    yield {"runtime": runtime, "registry": ModelRegistry(registry), "sink": sink, "holdout": prepared, "root": root}
    runtime.stop()
    sink.close()


def v1(stack, body, **kwargs) -> httpx.Response:
    return httpx.post(stack["runtime"].endpoints["v1"], json=body, **kwargs)


def v2(stack, body, **kwargs) -> httpx.Response:
    return httpx.post(stack["runtime"].endpoints["v2"], json=body, **kwargs)


def tensor(rows: np.ndarray) -> dict:
    return {"inputs": [{"name": "features", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}]}


def test_v1_v2_rest_and_grpc_agree_with_the_registry_model_offline(stack):
    from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig

    rows, names = stack["holdout"].holdout_features, stack["holdout"].feature_names
    offline, _ = stack["registry"].load("leaf", "1").predict(rows)
    by_v1 = v1(stack, {"instances": rows.tolist()}).json()["predictions"]
    keyed = v1(stack, {"instances": [dict(zip(names, map(float, r))) for r in rows[:20]]}).json()["predictions"]

    async def v2_and_grpc():
        request = InferRequest(model_name="leaf", infer_inputs=[InferInput("features", list(rows.shape), "FP32")])
        request.inputs[0].set_data_from_numpy(rows.astype(np.float32), binary_data=False)
        rest = InferenceRESTClient(RESTConfig(protocol="v2"))
        rest_answer = await rest.infer(stack["runtime"].endpoints["rest"], request, model_name="leaf")
        await rest.close()
        grpc_request = InferRequest(model_name="leaf", infer_inputs=[InferInput("features", list(rows.shape), "FP32")])
        grpc_request.inputs[0].set_data_from_numpy(rows.astype(np.float32))
        grpc_client = InferenceGRPCClient(stack["runtime"].endpoints["grpc"])
        grpc_answer = await grpc_client.infer(grpc_request)
        await grpc_client.close()
        return rest_answer, grpc_answer

    rest_answer, grpc_answer = asyncio.run(v2_and_grpc())
    by_rest = [o for o in rest_answer.outputs if o.name == "label"][0].as_numpy().astype(str).tolist()
    by_grpc = [o.decode() for o in [o for o in grpc_answer.outputs if o.name == "label"][0].as_numpy().tolist()]
    assert by_v1 == by_rest == by_grpc == offline.tolist()
    assert keyed == offline[:20].tolist()
    assert grpc_answer.model_version == "1"  # (kserve's REST client does not read model_version back)
    per_feature = {"inputs": [{"name": n, "shape": [3], "datatype": "FP64", "data": rows[:3, j].tolist()} for j, n in enumerate(names)]}
    assert [o for o in v2(stack, per_feature).json()["outputs"] if o["name"] == "label"][0]["data"] == offline[:3].tolist()


@pytest.fixture(scope="module")
def oip(shared_specs):
    document = yaml.safe_load((shared_specs / "oip" / "open_inference_rest.yaml").read_text())

    def validator(name: str) -> jsonschema.Draft7Validator:
        return jsonschema.Draft7Validator({**document["components"]["schemas"][name], "components": document["components"]})

    return validator


def test_v2_responses_validate_against_the_open_inference_protocol_schema(stack, oip):
    rows = stack["holdout"].holdout_features[:4]
    answer = v2(stack, tensor(rows)).json()
    oip("inference_response").validate(answer)
    assert {o["name"]: (o["datatype"], o["shape"]) for o in answer["outputs"]} == {
        "label": ("BYTES", [4]),
        "probabilities": ("FP32", [4, len(stack["registry"].metadata("leaf", "1")["classes"])]),
    }
    metadata = httpx.get(stack["runtime"].endpoints["rest"] + "/v2/models/leaf").json()
    oip("metadata_model_response").validate(metadata)
    assert metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, rows.shape[1]]}]
    error = v2(stack, {"inputs": []})
    oip("inference_error_response").validate(error.json())


BAD_V1 = [
    ({"instances": []}, 400, "empty batch: send at least one row"),
    ({"instances": [[1.0, 2.0]]}, 400, "instance 0 has 2 values; expected"),
    ({"instances": [{"nope": 1.0}]}, 400, "instance 0 has unknown feature(s) ['nope']"),
    ({"instances": [["x"] * 3]}, 400, "instance 0 has 3 values"),
    ({"rows": [[1.0]]}, 400, 'expected a JSON object {"instances"'),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_V1, ids=["empty", "short-row", "unknown-feature", "strings", "no-instances"])
def test_bad_v1_requests_get_400_with_the_reason_and_the_server_keeps_serving(stack, body, status, message):
    answer = v1(stack, body)
    assert answer.status_code == status
    assert message in answer.json()["error"]
    assert v1(stack, {"instances": stack["holdout"].holdout_features[:1].tolist()}).status_code == 200


def test_every_bad_input_class_has_its_status_and_message(stack):
    n_features = stack["holdout"].holdout_features.shape[1]
    row = stack["holdout"].holdout_features[:1]
    nan_row = row.copy()
    nan_row[0, 3] = np.nan
    cases = [
        (v2(stack, {"inputs": [{"name": "features", "shape": [1, 5], "datatype": "FP32", "data": [1, 2, 3, 4, 5]}]}), 400, f"expected [n, {n_features}]"),
        (v2(stack, {"inputs": [{"name": "features", "shape": [1, n_features], "datatype": "BYTES", "data": ["a"] * n_features}]}), 400, "datatype BYTES; expected FP32 or FP64"),
        (v2(stack, {"inputs": [{"name": "features", "shape": [2, n_features], "datatype": "FP32", "data": [1.0] * n_features}]}), 400, "does not match its"),
        (v2(stack, {"inputs": [{"name": "nope", "shape": [1], "datatype": "FP32", "data": [1.0]}, {"name": "other", "shape": [1], "datatype": "FP32", "data": [1.0]}]}), 400, "unknown feature input(s) ['nope', 'other']"),
        (v2(stack, {"inputs": "x"}), 400, "invalid V2 inference request"),
        (v2(stack, tensor(np.ones((1025, n_features)))), 400, "batch of 1025 rows is over the limit of 1024"),
        (httpx.post(stack["runtime"].endpoints["v2"], content=b"{not json", headers={"content-type": "application/json"}), 400, "not valid JSON"),
        (httpx.post(stack["runtime"].endpoints["v1"], content=b"{not json", headers={"content-type": "application/json"}), 400, "Unrecognized request format"),
        (httpx.post(stack["runtime"].endpoints["v1"], content=b"plain text", headers={"content-type": "text/plain"}), 400, "request body is not JSON"),
        (httpx.post(stack["runtime"].endpoints["rest"] + "/v2/models/unknown/infer", json=tensor(row)), 404, "unknown"),
        (httpx.post(stack["runtime"].endpoints["rest"] + "/v1/models/unknown:predict", json={"instances": row.tolist()}), 404, "unknown"),
    ]
    for answer, status, message in cases:
        assert (answer.status_code, message in answer.json()["error"]) == (status, True), answer.text
    # NaN cannot be written in JSON; it can in a binary gRPC tensor:
    from kserve import InferenceGRPCClient, InferInput, InferRequest

    async def grpc_calls():
        client = InferenceGRPCClient(stack["runtime"].endpoints["grpc"])
        outcomes = []
        for name, rows in (("leaf", nan_row), ("unknown", row), ("leaf", row)):
            request = InferRequest(model_name=name, infer_inputs=[InferInput("features", list(rows.shape), "FP32")])
            request.inputs[0].set_data_from_numpy(rows.astype(np.float32))
            try:
                await client.infer(request)
                outcomes.append("OK")
            except Exception as exc:  # InferenceGRPCClient re-raises grpc's AioRpcError
                outcomes.append(f"{exc.code().name}: {exc.details()}")
        await client.close()
        return outcomes

    nan_outcome, unknown_outcome, good_outcome = asyncio.run(grpc_calls())
    assert nan_outcome.startswith("INVALID_ARGUMENT: row 0, feature") and "is not a finite number" in nan_outcome
    assert unknown_outcome.startswith("NOT_FOUND")
    assert good_outcome == "OK"


def test_payload_events_are_kserve_shaped_cloudevents_with_the_trace(stack):
    sink = stack["sink"]
    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    answer = v1(stack, {"instances": stack["holdout"].holdout_features[:2].tolist()}, headers={"traceparent": trace, "ce-id": "call-42"})
    assert answer.status_code == 200
    deadline = time.time() + 10
    while time.time() < deadline and len([e for e in sink.events if e["id"] == "call-42"]) < 2:
        time.sleep(0.05)
    events = {e["type"]: e for e in sink.events if e["id"] == "call-42"}
    request, response = events["org.kubeflow.serving.inference.request"], events["org.kubeflow.serving.inference.response"]
    assert request.data == {"instances": stack["holdout"].holdout_features[:2].tolist()}
    assert response.data == answer.json()
    for event in (request, response):
        assert event["specversion"] == "1.0" and event["datacontenttype"] == "application/json"
        assert event["inferenceservicename"] == "leaf" and event["component"] == "transformer"
        assert event["traceparent"].split("-")[1] == "0af7651916cd43dd8448eb211c80319c"
        assert event["traceparent"] != trace  # a child span of the caller's


def test_requests_are_counted_by_status_class_and_version(stack):
    def count(status_class: str) -> float:
        for line in httpx.get(stack["runtime"].endpoints["rest"] + "/metrics").text.splitlines():
            if line.startswith("kfloop_requests_total{") and f'status_class="{status_class}"' in line and 'model="leaf"' in line and 'version="1"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    ok, client_errors = count("2xx"), count("4xx")
    v1(stack, {"instances": stack["holdout"].holdout_features[:1].tolist()})
    v1(stack, {"instances": []})
    assert (count("2xx") - ok, count("4xx") - client_errors) == (1.0, 1.0)


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


def test_a_transformer_pinned_to_one_version_learns_the_version_its_predictor_serves(stack, tmp_path):
    registry = stack["registry"]
    rows = stack["holdout"].holdout_features[:3]
    predictor_port, transformer_port = free_port(), free_port()
    base = [sys.executable, "-m", "kfloop"]
    processes = [
        subprocess.Popen(base + ["predictor", "--model-dir", registry.uri("leaf", "2"), "--model", "leaf", "--http-port", str(predictor_port), "--no-grpc"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen(base + ["transformer", "--model", "leaf", "--registry", registry.root, "--version", "1", "--predictor-host", f"127.0.0.1:{predictor_port}", "--http-port", str(transformer_port), "--no-grpc", "--logger-url", f"http://127.0.0.1:{free_port()}/"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    try:
        deadline = time.time() + 60
        answer = None
        ready = [f"http://127.0.0.1:{port}/v2/models/leaf/ready" for port in (predictor_port, transformer_port)]
        while time.time() < deadline:
            try:
                if all(httpx.get(url).status_code == 200 for url in ready):
                    answer = httpx.post(f"http://127.0.0.1:{transformer_port}/v2/models/leaf/infer", json=tensor(rows))
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        # The predictor refused features scaled for version 1 (409 naming version 2); the transformer
        # loaded version 2's preprocessor and asked again.
        assert answer is not None and answer.status_code == 200, answer
        document = answer.json()
        offline, _ = registry.load("leaf", "2").predict(rows)
        assert document["model_version"] == "2"
        assert next(o["data"] for o in document["outputs"] if o["name"] == "label") == offline.tolist()
        # Its payload sink is down: the request event could not be delivered, and that is only counted.
        time.sleep(1.0)
        metrics = httpx.get(f"http://127.0.0.1:{transformer_port}/metrics").text
        assert 'kfloop_payload_events_total{model="leaf",outcome="failed"} ' in metrics
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(20)


def test_kfloop_serve_stops_every_process_it_started_on_sigterm(stack, tmp_path):
    registry = stack["registry"]
    http_port, admin_port = free_port(), free_port()
    serve = subprocess.Popen(
        [sys.executable, "-m", "kfloop", "serve", "--registry", registry.root, "--model", "leaf", "--replicas", "2",
         "--http-port", str(http_port), "--grpc-port", str(free_port()), "--admin-port", str(admin_port), "--home", str(tmp_path)],
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
        assert httpx.post(f"http://127.0.0.1:{http_port}/v1/models/leaf:predict", json={"instances": stack["holdout"].holdout_features[:1].tolist()}).status_code == 200
        scaled = httpx.post(f"http://127.0.0.1:{admin_port}/replicas", json={"replicas": 3}).json()
        assert scaled == {"replicas": 3}
        pids += [r["pid"] for s in httpx.get(f"http://127.0.0.1:{admin_port}/status").json()["traffic"] for r in s["replicas"]]
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(60)
    assert serve.returncode == 0
    alive = [pid for pid in set(pids) if Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()]
    assert alive == []


def test_a_transformer_before_replicas_of_two_versions_scales_each_row_for_the_version_that_answers(tmp_path, serving_data):
    """One address, pods of the old and the new version behind it: a cluster Service in a rolling update."""
    from conftest import wait_until_answering
    from kfloop.data import LabelledData, load_dataset, save_csv

    registry = tmp_path / "registry"
    register_version(registry, "leaf", serving_data, n_estimators=20, work=tmp_path / "v1")
    data = load_dataset(serving_data)
    rescaled = tmp_path / "rescaled.csv"  # another scaler: rows scaled for one version are wrong for the other
    save_csv(LabelledData(data.features * 2.0 + 1.0, data.labels, data.feature_names, "rescaled"), str(rescaled), id_prefix="r")
    register_version(registry, "leaf", str(rescaled), n_estimators=20, work=tmp_path / "v2", promote=False, target="label")
    store = ModelRegistry(registry)
    ports = [free_port() for _ in range(3)]
    common = [sys.executable, "-m", "kfloop"]
    argv = [common + ["predictor", "--registry", str(registry), "--model", "leaf", "--version", version,
                      "--http-port", str(port), "--no-grpc"] for version, port in (("1", ports[0]), ("2", ports[1]))]
    argv.append(common + ["transformer", "--registry", str(registry), "--model", "leaf", "--no-grpc", "--no-admin",
                          "--predictor-host", f"127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}", "--http-port", str(ports[2])])
    processes = [subprocess.Popen(a, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for a in argv]
    try:
        for port in ports:
            wait_until_answering(f"http://127.0.0.1:{port}/v2/models/leaf/ready", f"server on {port}", 90)
        rows = data.features[:40]
        offline = {version: store.load("leaf", version).predict(rows)[0] for version in ("1", "2")}
        assert np.mean(offline["1"] != offline["2"]) > 0.5  # the two versions disagree on these rows
        answered = {"1": 0, "2": 0}
        for index, row in enumerate(rows):
            answer = httpx.post(f"http://127.0.0.1:{ports[2]}/v2/models/leaf/infer", json=tensor(row[None]))
            assert answer.status_code == 200, answer.text
            document = answer.json()
            label = next(o["data"][0] for o in document["outputs"] if o["name"] == "label")
            assert label == offline[document["model_version"]][index]
            answered[document["model_version"]] += 1
        assert min(answered.values()) > 0, answered

        refused = httpx.post(f"http://127.0.0.1:{ports[1]}/v2/models/leaf/infer", json={"inputs": [
            {"name": "features@1", "shape": [1, rows.shape[1]], "datatype": "FP32", "data": rows[0].tolist()}]})
        assert refused.status_code == 409 and refused.headers["x-kfloop-model-version"] == "2"
        assert refused.json() == {"error": "this predictor serves version 2; the request has features scaled for version(s) ['1']"}
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(30)
