"""The KServe model servers kfloop starts (transformer and predictors, on REST and gRPC): answers that
validate against the Open Inference Protocol, every bad input answered with its status and reason, and
requests counted by status class and version."""

from __future__ import annotations

import asyncio

import httpx
import jsonschema
import numpy as np
import pytest
import yaml

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
