"""Explanations through the real transformer and predictors of the shared local runtime: V1 ``:explain``,
V2 REST and gRPC explanation outputs (exact ones add up to the answered probability), requests pinned to a
version explain that version, every bad input is a 4xx in the protocol's format, and a version that keeps no
forest is a 404 naming it."""

from __future__ import annotations

import asyncio
import shutil
import sys

import httpx
import numpy as np
import pytest

from kfloop.local.supervisor import ManagedProcess, free_port
from testbed import tensor

pytestmark = pytest.mark.slow


def explain_v2(stack, rows: np.ndarray, outputs=("attributions", "base_values"), parameters=None, path="infer") -> httpx.Response:
    body = tensor(rows) | {"outputs": [{"name": name} for name in outputs], "parameters": parameters or {}}
    return httpx.post(f"{stack['runtime'].endpoints['rest']}/v2/models/leaf/{path}", json=body, timeout=60)


def outputs_of(answer: httpx.Response) -> dict[str, np.ndarray]:
    return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in answer.json()["outputs"]}


def test_v1_explain_through_the_transformer_gives_kserves_shape_with_exact_attributions_that_add_up(stack):
    rows = stack["holdout"].holdout_features[:3]
    answer = httpx.post(stack["runtime"].endpoints["explain"], json={"instances": rows.tolist(), "top_k": 0}, timeout=60)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    predictions = httpx.post(stack["runtime"].endpoints["v1"], json={"instances": rows.tolist()}).json()["predictions"]
    assert body["predictions"] == predictions and len(body["explanations"]) == 3
    names = stack["registry"].metadata("leaf", "1")["feature_names"]
    for explanation, predicted in zip(body["explanations"], predictions):
        assert explanation["method"] == "exact" and explanation["approximate"] is False and explanation["version"] == "1"
        [explained] = explanation["classes"]
        assert explained["class"] == predicted and sorted(explained["attributions"]) == sorted(names)
        total = sum(explained["attributions"].values()) + explained["base_value"]
        assert abs(total - explained["probability"]) < 1e-6


def test_v2_rest_and_grpc_carry_the_same_top_attributions_named_by_feature(stack):
    from kserve import InferenceGRPCClient, InferInput, InferRequest
    from kserve.protocol.infer_type import RequestedOutput

    rows = stack["holdout"].holdout_features[:2]
    rest = explain_v2(stack, rows, parameters={"top_k": 5})
    assert rest.status_code == 200, rest.text
    assert rest.json()["parameters"]["explanation_method"] == "exact" and rest.json()["parameters"]["approximate"] is False
    tensors = outputs_of(rest)
    assert tensors["attributions"].shape == (2, 5) and tensors["attribution_features"].shape == (2, 5)
    assert tensors["base_values"].shape == (2,) and tensors["explained_class"].shape == (2,)
    assert (np.diff(np.abs(tensors["attributions"]), axis=1) <= 0).all()

    async def by_grpc():
        request = InferRequest(model_name="leaf", infer_inputs=[InferInput("features", list(rows.shape), "FP32")],
                               request_outputs=[RequestedOutput("attributions")], parameters={"top_k": 5})
        request.inputs[0].set_data_from_numpy(rows.astype(np.float32))
        client = InferenceGRPCClient(stack["runtime"].endpoints["grpc"])
        try:
            return await client.infer(request)
        finally:
            await client.close()

    answer = asyncio.run(by_grpc())
    grpc = {o.name: o.as_numpy() for o in answer.outputs}
    np.testing.assert_allclose(grpc["attributions"], tensors["attributions"], atol=1e-12)
    assert [name.decode() for name in grpc["attribution_features"].ravel()] == tensors["attribution_features"].ravel().tolist()


def test_approximate_and_every_class_are_labelled_and_shaped(stack):
    rows = stack["holdout"].holdout_features[:2]
    answer = explain_v2(stack, rows, parameters={"method": "approximate", "classes": "all", "top_k": 3})
    assert answer.status_code == 200, answer.text
    assert answer.json()["parameters"] == {"explanation_method": "approximate", "approximate": True}
    tensors = outputs_of(answer)
    classes = len(stack["registry"].metadata("leaf", "1")["classes"])
    assert tensors["attributions"].shape[0] == 2 and tensors["attributions"].shape[2] == 3
    assert tensors["explained_class"].shape == tensors["base_values"].shape == tensors["attributions"].shape[:2]
    assert tensors["attributions"].shape[1] <= classes


def test_a_pinned_request_explains_the_version_it_names(stack):
    runtime = stack["runtime"]
    runtime.set_traffic({"1": 50.0, "2": 50.0})
    try:
        rows = stack["holdout"].holdout_features[:1]
        for version in ("1", "2"):
            answer = explain_v2(stack, rows, parameters={"top_k": 0}, path=f"versions/{version}/infer")
            assert answer.status_code == 200 and answer.json()["model_version"] == version, answer.text
        assert explain_v2(stack, rows, path="versions/9/infer").status_code == 404
    finally:
        runtime.switch_version("1")


@pytest.mark.parametrize("body, status, message", [
    ({"outputs": [{"name": "reasons"}]}, 400, "unknown output(s) ['reasons']"),
    ({"parameters": {"method": "lime"}}, 400, "method must be one of exact, approximate"),
    ({"parameters": {"top_k": -2}}, 400, "top_k must be a whole number"),
    ({"parameters": {"classes": "every"}}, 400, "classes must be one of predicted, all"),
])
def test_bad_explanation_requests_are_4xx_in_the_v2_error_format(stack, body, status, message):
    rows = stack["holdout"].holdout_features[:1]
    request = tensor(rows) | {"outputs": [{"name": "attributions"}]} | body
    answer = httpx.post(stack["runtime"].endpoints["v2"], json=request, timeout=60)
    assert answer.status_code == status and message in answer.json()["error"], answer.text


def test_too_many_rows_nan_and_a_bad_v1_body_are_refused_before_any_work(stack):
    rows = np.repeat(stack["holdout"].holdout_features[:1], 33, axis=0)
    v2 = httpx.post(stack["runtime"].endpoints["v2"], json=tensor(rows) | {"outputs": [{"name": "attributions"}]})
    assert v2.status_code == 413 and "at most 32 per request" in v2.json()["error"]
    v1 = httpx.post(stack["runtime"].endpoints["explain"], json={"instances": rows.tolist()})
    assert v1.status_code == 413
    nan = stack["holdout"].holdout_features[:1].tolist()
    nan[0][0] = "NaN"
    assert httpx.post(stack["runtime"].endpoints["explain"], json={"instances": nan}).status_code == 400
    assert httpx.post(stack["runtime"].endpoints["explain"], json={"rows": [1]}).status_code == 400
    assert httpx.post(stack["runtime"].endpoints["explain"], json={"instances": [[1.0]]}).status_code == 400


def test_a_version_that_keeps_no_forest_answers_404_naming_it(stack, tmp_path):
    folder = tmp_path / "1"
    shutil.copytree(stack["registry"].uri("leaf", "1"), folder)
    (folder / "model.joblib").unlink()
    port = free_port()
    predictor = ManagedProcess("predictor without its forest",
                               [sys.executable, "-m", "kfloop", "predictor", "--model-dir", str(folder), "--model", "leaf",
                                "--http-port", str(port), "--no-grpc"],
                               f"http://127.0.0.1:{port}/v2/models/leaf/ready", tmp_path / "predictor.log")
    predictor.spawn()
    try:
        predictor.wait_ready()
        scaled = stack["registry"].preprocessor("leaf", "1").transform(stack["holdout"].holdout_features[:1])
        answer = httpx.post(f"http://127.0.0.1:{port}/v2/models/leaf/infer", json=tensor(scaled) | {"outputs": [{"name": "attributions"}]})
        assert answer.status_code == 404 and "version 1 keeps no forest" in answer.json()["error"], answer.text
        prediction = httpx.post(f"http://127.0.0.1:{port}/v2/models/leaf/infer", json=tensor(scaled))
        assert prediction.status_code == 200  # predictions go on from the ONNX graph
    finally:
        predictor.stop()


def test_a_predictor_killed_with_sigkill_leaves_no_explain_worker_behind(stack, tmp_path):
    import signal
    import subprocess
    import time

    import psutil

    port = free_port()
    predictor = subprocess.Popen([sys.executable, "-m", "kfloop", "predictor", "--model-dir", stack["registry"].uri("leaf", "1"),
                                  "--model", "leaf", "--http-port", str(port), "--no-grpc"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ready = f"http://127.0.0.1:{port}/v2/models/leaf/ready"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(ready).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        scaled = stack["registry"].preprocessor("leaf", "1").transform(stack["holdout"].holdout_features[:1])
        answer = httpx.post(f"http://127.0.0.1:{port}/v2/models/leaf/infer",
                            json=tensor(scaled) | {"outputs": [{"name": "attributions"}]}, timeout=60)
        assert answer.status_code == 200, answer.text
        workers = psutil.Process(predictor.pid).children(recursive=True)
        assert workers  # the explain worker (and multiprocessing's resource tracker)
    finally:
        predictor.send_signal(signal.SIGKILL)
        predictor.wait(30)
    _, alive = psutil.wait_procs(workers, timeout=15)
    assert alive == [], [p.pid for p in alive]
