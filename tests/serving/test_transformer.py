"""The transformer as a real process before real predictor replicas: V1, V2 REST and gRPC agree with the
registry's model, and rows are scaled for the version of the replica that answers (one pinned version,
replicas of two versions behind one address); a request pinned to a version (OIP ``/versions/{v}/infer``,
gRPC ``model_version``) is answered by that version in a canary, a shadow route or a route mid-rollout."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from testbed import register_version, tensor, v1, v2
from kfloop.credentials import bearer, local_token
from kfloop.registry import ModelRegistry
from kfloop.local.supervisor import free_port

pytestmark = pytest.mark.slow


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


def test_a_transformer_pinned_to_one_version_learns_the_version_its_predictor_serves(stack, tmp_path):
    registry = stack["registry"]
    rows = stack["holdout"].holdout_features[:3]
    predictor_port, transformer_port = free_port(), free_port()
    base = [sys.executable, "-m", "kfloop"]
    processes = [
        subprocess.Popen(base + ["predictor", "--model-dir", registry.uri("leaf", "2"), "--model", "leaf", "--http-port", str(predictor_port), "--no-grpc"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen(base + ["transformer", "--model", "leaf", "--registry", registry.root, "--version", "1", "--predictor-host", f"127.0.0.1:{predictor_port}", "--http-port", str(transformer_port), "--no-grpc", "--logger-url", f"http://127.0.0.1:{predictor_port}/"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
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
        # Its payload sink refuses events for good (the predictor's port answers POST / with 404): the request
        # event could not be delivered, and that is only counted.
        time.sleep(1.0)
        metrics = httpx.get(f"http://127.0.0.1:{transformer_port}/metrics").text
        assert 'kfloop_payload_events_total{model="leaf",outcome="failed"} ' in metrics
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(20)


def test_a_transformer_before_replicas_of_two_versions_scales_each_row_for_the_version_that_answers(tmp_path, serving_data):
    """One address, pods of the old and the new version behind it: a cluster Service in a rolling update."""
    from testbed import wait_until_answering
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
    argv.append(common + ["transformer", "--registry", str(registry), "--model", "leaf", "--no-grpc",
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


def pinned(stack, version: str, rows: np.ndarray, model: str = "leaf") -> httpx.Response:
    return httpx.post(f"{stack['runtime'].endpoints['rest']}/v2/models/{model}/versions/{version}/infer", json=tensor(rows))


def labels_and_proba(answer: httpx.Response) -> tuple[str, list, np.ndarray]:
    """(model_version, labels, probabilities) of a V2 answer."""
    outputs = {o["name"]: o for o in answer.json()["outputs"]}
    proba = np.reshape(outputs["probabilities"]["data"], outputs["probabilities"]["shape"])
    return answer.json()["model_version"], outputs["label"]["data"], proba


def test_during_a_canary_a_request_pinned_to_a_version_is_answered_by_that_version_with_rows_scaled_for_it(stack):
    from kserve import InferenceGRPCClient, InferInput, InferRequest

    runtime, registry = stack["runtime"], stack["registry"]
    rows = stack["holdout"].holdout_features[:8]
    offline = {version: registry.load("leaf", version).predict(rows) for version in ("1", "2")}
    assert not np.allclose(offline["1"][1], offline["2"][1], atol=1e-3)  # the versions' probabilities differ
    runtime.set_traffic({"1": 90, "2": 10})
    try:
        rest = runtime.endpoints["rest"]
        assert httpx.get(f"{rest}/v2/models/leaf").json()["versions"] == ["1", "2"]
        assert httpx.get(f"{rest}/v2/models/leaf/versions/2").json()["versions"] == ["1", "2"]
        assert httpx.get(f"{rest}/v2/models/leaf/versions/2/ready").json() == {"name": "leaf", "ready": True}
        for version, times in (("2", 20), ("1", 5)):  # 20 calls at 10 %: unpinned, some would go to version 1
            for _ in range(times):
                answered, labels, proba = labels_and_proba(pinned(stack, version, rows))
                assert (answered, labels) == (version, offline[version][0].tolist())
                np.testing.assert_allclose(proba, offline[version][1], atol=1e-5)
        for version, model in (("3", "leaf"), ("latest", "leaf"), ("1", "other")):
            refused = pinned(stack, version, rows, model)
            assert refused.status_code == 404 and "error" in refused.json(), refused.text
        assert pinned(stack, "3", rows).json() == {"error": "model 'leaf' has no version '3' here; versions served: 1, 2"}

        async def grpc_pinned(version: str) -> str:
            client = InferenceGRPCClient(runtime.endpoints["grpc"])
            request = InferRequest(model_name="leaf", infer_inputs=[InferInput("features", list(rows.shape), "FP32")],
                                   model_version=version)
            request.inputs[0].set_data_from_numpy(rows.astype(np.float32))
            try:
                return (await client.infer(request)).model_version
            finally:
                await client.close()

        assert {asyncio.run(grpc_pinned("2")) for _ in range(10)} == {"2"}
    finally:
        runtime.set_traffic({"1": 100})
    assert httpx.get(f"{runtime.endpoints['rest']}/v2/models/leaf").json()["versions"] == ["1"]
    assert pinned(stack, "2", rows).status_code == 404


def test_a_pinned_request_reaches_a_shadow_route_and_a_version_found_behind_a_routes_address(stack):
    runtime = stack["runtime"]
    rows = stack["holdout"].holdout_features[:4]
    routes_url = f"http://127.0.0.1:{runtime.transformer_control_port}/kfloop/routes"
    auth = bearer(local_token(runtime.home))
    runtime.set_traffic({"1": 90, "2": 10})  # starts replicas of version 2
    try:
        upstreams = {route["version"]: route["upstreams"] for route in httpx.get(routes_url, headers=auth).json()["routes"]}
        shadow = {"routes": [{"version": "1", "weight": 100, "upstreams": upstreams["1"]},
                             {"version": "2", "weight": 0, "upstreams": upstreams["2"]}]}
        assert httpx.put(routes_url, json=shadow, headers=auth).status_code == 200
        assert {v2(stack, tensor(rows)).json()["model_version"] for _ in range(20)} == {"1"}  # no traffic to the shadow
        assert {pinned(stack, "2", rows).json()["model_version"] for _ in range(5)} == {"2"}

        # One route, one version on record, replicas of both behind it (a Service mid-rollout): unpinned calls
        # learn that version 2 answers there too; a call pinned to 2 is then answered by a version 2 replica only.
        mixed = {"routes": [{"version": "1", "weight": 100, "upstreams": upstreams["1"] + upstreams["2"]}]}
        assert httpx.put(routes_url, json=mixed, headers=auth).status_code == 200
        assert pinned(stack, "2", rows).status_code == 404  # not known to be served there yet
        for _ in range(20):
            assert v2(stack, tensor(rows)).status_code == 200
        assert httpx.get(routes_url, headers=auth).json()["routes"][0]["also"] == ["2"]
        offline, _ = stack["registry"].load("leaf", "2").predict(rows)
        for _ in range(10):
            answered, labels, _ = labels_and_proba(pinned(stack, "2", rows))
            assert (answered, labels) == ("2", offline.tolist())
    finally:
        runtime.set_traffic({"1": 100})
    assert [route["version"] for route in httpx.get(routes_url, headers=auth).json()["routes"]] == ["1"]
