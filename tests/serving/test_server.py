"""The KServe model servers kfloop starts (transformer and predictors, on REST and gRPC): answers that
validate against the Open Inference Protocol, every bad input answered with its status and reason,
requests counted by status class and version, and the protocol's versioned routes (REST and gRPC) answered
for the version served and 404 for any other."""

from __future__ import annotations

import asyncio

import httpx
import jsonschema
import numpy as np
import pytest
import yaml

from kfloop.credentials import bearer, local_token
from testbed import tensor, v1, v2

pytestmark = pytest.mark.slow


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


def rss_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def test_a_body_over_the_limit_gets_413_before_it_is_read_and_the_server_keeps_serving(stack):
    url = stack["runtime"].endpoints["v2"]
    huge = b'{"inputs": [' + b"0.0," * (32 * 1024 * 1024 // 4) + b"0.0]}"  # 32 MiB, over the 16 MiB limit
    declared = httpx.post(url, content=huge, headers={"content-type": "application/json"}, timeout=30)
    assert declared.status_code == 413 and "over the limit" in declared.json()["error"]

    def chunks():  # no Content-Length: refused once the limit is passed
        for start in range(0, len(huge), 1024 * 1024):
            yield huge[start:start + 1024 * 1024]

    streamed = httpx.post(url, content=chunks(), headers={"content-type": "application/json"}, timeout=30)
    assert streamed.status_code == 413
    padded = httpx.post(url, content=b"{}", headers={"content-type": "application/json", "x-pad": "x" * (1 << 20)}, timeout=30)
    assert padded.status_code == 431  # headers are bounded too, before the app sees the request
    peak_mb = rss_kb(stack["runtime"].transformer.pid) / 1024
    assert peak_mb < 600, f"transformer peak RSS {peak_mb:.0f} MB"
    assert v1(stack, {"instances": stack["holdout"].holdout_features[:1].tolist()}).status_code == 200


def test_made_up_model_names_do_not_make_new_metric_series(stack):
    rest = stack["runtime"].endpoints["rest"]
    for index in range(50):
        assert httpx.post(f"{rest}/v2/models/made-up-{index}/infer", json={"inputs": []}).status_code == 404
    series = [line for line in httpx.get(rest + "/metrics").text.splitlines() if line.startswith("kfloop_requests_total{")]
    assert not [line for line in series if "made-up" in line]
    assert any('model="unknown"' in line and 'status_class="4xx"' in line for line in series)


def test_route_administration_is_off_the_client_port_behind_the_token_json_only_and_names_registry_versions(stack):
    runtime = stack["runtime"]
    client_routes = runtime.endpoints["rest"] + "/kfloop/routes"
    hijack = {"routes": [{"version": "1", "weight": 100, "upstreams": ["127.0.0.1:9"]}]}
    assert httpx.put(client_routes, json=hijack).status_code == 404  # the client-facing port has no control routes
    assert httpx.get(client_routes).status_code == 404
    routes = f"http://127.0.0.1:{runtime.transformer_control_port}/kfloop/routes"
    auth = bearer(local_token(runtime.home))
    assert httpx.put(routes, json=hijack).status_code == 401
    assert httpx.get(routes).status_code == 401
    assert httpx.put(routes, json=hijack, headers={"authorization": "Bearer nope"}).status_code == 403
    assert httpx.put(routes, json=hijack, headers=auth | {"host": "rebound.example"}).status_code == 403
    current = httpx.get(routes, headers=auth).json()["routes"]
    upstreams = current[0]["upstreams"]
    as_text = httpx.put(routes, content=b'{"routes": []}', headers=auth | {"content-type": "text/plain"})
    assert as_text.status_code == 415
    for version in ("../other/1", "1/../../x", "one"):
        answer = httpx.put(routes, json={"routes": [{"version": version, "weight": 100, "upstreams": upstreams}]}, headers=auth)
        assert answer.status_code == 400 and "not a registry version" in answer.json()["error"], version
    for bad in ({"routes": "all"}, {"routes": [{"version": "1", "upstreams": ["not a host"]}]}, [1, 2]):
        assert httpx.put(routes, json=bad, headers=auth).status_code == 400, bad
    too_big = httpx.put(routes, content=b" " * (200 * 1024), headers=auth | {"content-type": "application/json"})
    assert too_big.status_code == 413
    assert httpx.get(routes, headers=auth).json()["routes"] == current
    assert v1(stack, {"instances": stack["holdout"].holdout_features[:1].tolist()}).status_code == 200


@pytest.mark.parametrize("server", ["transformer", "predictor"])
def test_versioned_routes_answer_for_the_version_served_and_404_for_any_other(stack, oip, server):
    runtime = stack["runtime"]
    base = runtime.endpoints["rest"] if server == "transformer" else f"http://{runtime.status()['traffic'][0]['replicas'][0]['address']}"
    rows = stack["holdout"].holdout_features[:5]
    metadata = httpx.get(f"{base}/v2/models/leaf/versions/1")
    assert metadata.status_code == 200
    oip("metadata_model_response").validate(metadata.json())
    assert (metadata.json()["name"], metadata.json()["versions"]) == ("leaf", ["1"])
    assert httpx.get(f"{base}/v2/models/leaf/versions/1/ready").json() == {"name": "leaf", "ready": True}
    if server == "transformer":
        answer = httpx.post(f"{base}/v2/models/leaf/versions/1/infer", json=tensor(rows))
        oip("inference_response").validate(answer.json())
        assert answer.json()["model_version"] == "1"
        offline, _ = stack["registry"].load("leaf", "1").predict(rows)
        assert next(o["data"] for o in answer.json()["outputs"] if o["name"] == "label") == offline.tolist()
    else:  # a predictor takes rows already scaled for its version
        scaled = stack["registry"].load("leaf", "1").preprocessor.transform(rows)
        answer = httpx.post(f"{base}/v2/models/leaf/versions/1/infer", json=tensor(scaled))
        assert (answer.status_code, answer.json()["model_version"]) == (200, "1")
    for path in ("leaf/versions/2", "leaf/versions/3", "leaf/versions/latest", "leaf/versions/01"):
        for method, url in (("GET", f"{base}/v2/models/{path}"), ("GET", f"{base}/v2/models/{path}/ready"),
                            ("POST", f"{base}/v2/models/{path}/infer")):
            refused = httpx.request(method, url, json=tensor(rows))
            assert refused.status_code == 404, (method, url, refused.text)
            assert refused.json()["error"].startswith("model 'leaf' has no version") and "versions served: 1" in refused.json()["error"]
    for method, url in (("GET", f"{base}/v2/models/other/versions/1"), ("GET", f"{base}/v2/models/other/versions/1/ready"),
                        ("POST", f"{base}/v2/models/other/versions/1/infer")):
        refused = httpx.request(method, url, json=tensor(rows))
        assert (refused.status_code, "other" in refused.json()["error"]) == (404, True), (method, url, refused.text)


def test_grpc_honours_the_version_in_model_infer_ready_and_metadata(stack):
    import grpc
    from kserve import InferenceGRPCClient, InferInput, InferRequest
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    rows = stack["holdout"].holdout_features[:3]

    async def infer(version: str) -> str:
        client = InferenceGRPCClient(stack["runtime"].endpoints["grpc"])
        request = InferRequest(model_name="leaf", infer_inputs=[InferInput("features", list(rows.shape), "FP32")], model_version=version)
        request.inputs[0].set_data_from_numpy(rows.astype(np.float32))
        try:
            return f"OK {(await client.infer(request)).model_version}"
        except Exception as exc:  # InferenceGRPCClient re-raises grpc's AioRpcError
            return f"{exc.code().name}: {exc.details()}"
        finally:
            await client.close()

    assert asyncio.run(infer("1")) == "OK 1"
    assert asyncio.run(infer("3")) == "NOT_FOUND: model 'leaf' has no version '3' here; versions served: 1"
    with grpc.insecure_channel(stack["runtime"].endpoints["grpc"]) as channel:
        stub = GRPCInferenceServiceStub(channel)
        assert stub.ModelReady(pb.ModelReadyRequest(name="leaf", version="1")).ready is True
        assert list(stub.ModelMetadata(pb.ModelMetadataRequest(name="leaf", version="1")).versions) == ["1"]
        assert list(stub.ModelMetadata(pb.ModelMetadataRequest(name="leaf")).versions) == ["1"]
        for call, request in ((stub.ModelReady, pb.ModelReadyRequest(name="leaf", version="3")),
                              (stub.ModelMetadata, pb.ModelMetadataRequest(name="leaf", version="latest"))):
            with pytest.raises(grpc.RpcError) as caught:
                call(request)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
