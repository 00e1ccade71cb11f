"""The InferenceService's containers as KServe starts them, with the arguments `kfloop manifests` renders:
the storage initializer (credentials in its environment only) fills /mnt/models from S3; the predictor reads
it read-only with no credentials; the transformer reaches it with ``--predictor_host``; its payload events
reach a watch container; an alarm carrying the credentials a Knative Trigger presents reaches a trigger
container, which records the run it could not submit (no Kubeflow Pipelines here) as not charged.

What differs from a cluster, and why: every container shares the host's network (each server on
127.0.0.1 and a port of its own instead of 0.0.0.0:8080 in its own pod), the transformer also serves gRPC
(the rendered InferenceService exposes one port), and its payload events go straight to the watch (on a
cluster KServe's logger sends them).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path

import httpx
import jwt
import numpy as np
import pytest
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent
from docker.types import Mount

from objectstore import INITIALIZER
from oidc_issuer import ISSUER, RSA_KEY, Issuer
from testbed import Containers, register_version
from kfloop.event_types import DRIFT_EVENT
from kfloop.local.runtime import ServingRuntime
from kfloop.local.supervisor import free_port
from kfloop.manifests.render import render_objects
from kfloop.policies import load_policy
from kfloop.registry import ModelRegistry
from kfloop.training import Prepared

pytestmark = pytest.mark.containers

MODEL = "classifier"  # the default policy's model, the InferenceService's name
NAMESPACE = "kfloop"


def args_of(objects: list[dict], kind: str, name: str, part: str | None = None) -> list[str]:
    """The container args a rendered object gives (``part``: the InferenceService's predictor or transformer)."""
    found = next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)
    if kind == "InferenceService":
        spec = found["spec"][part]
        return list(spec["model"]["args"] if part == "predictor" else spec["containers"][0]["args"])
    return list(found["spec"]["template"]["spec"]["containers"][0]["args"])


def replaced(args: list[str], **values: str) -> list[str]:
    """``args`` with the values of ``--flag`` options replaced (flag names with ``_`` for ``-``)."""
    args = list(args)
    for flag, value in values.items():
        option = "--" + flag.replace("_", "-")
        args[args.index(option) + 1] = value
    return args


def wait_ready(url: str, container, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        container.reload()
        if container.status == "exited":
            raise AssertionError(f"{container.name} exited: {container.logs().decode()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} not ready after {seconds} s: {container.logs().decode()[-3000:]}")


def writable_folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, 10001, 10001)  # as an emptyDir with fsGroup 10001
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory, s3_server):
    """Version 1 of ``classifier`` in a local registry (for the local runtime) and, file for file, in S3."""
    root = tmp_path_factory.mktemp("served")
    register_version(root / "registry", MODEL, "builtin:digits", n_estimators=30, work=root / "v1")
    local = ModelRegistry(root / "registry")
    saved = {k: os.environ.get(k) for k in s3_server.env}
    os.environ.update(s3_server.env)
    try:
        s3_root = f"s3://kfloop/chain-{uuid.uuid4().hex[:8]}/registry"
        s3 = ModelRegistry(s3_root)
        folder = Path(local.uri(MODEL, "1"))
        files = {p.name: str(p) for p in folder.iterdir() if p.name != "metadata.json"}
        assert s3.register(MODEL, files, local.metadata(MODEL, "1")) == "1"
        s3.promote(MODEL, "1", {"reason": "test"})
    finally:
        for name, value in saved.items():
            os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)
    holdout = Prepared.load(str(root / "v1" / "prepared.npz")).holdout_features[:40]
    objects = render_objects(load_policy(None), namespace=NAMESPACE, image="kfloop:local",
                             storage_uri=s3.uri(MODEL, "1"), registry_uri=s3_root,
                             prometheus_url="http://prometheus-operated.monitoring.svc.cluster.local:9090")
    return {"root": root, "local": local, "s3_root": s3_root, "objects": objects, "rows": holdout}


@pytest.fixture(scope="module")
def chain(served, s3_server, docker_client, image, tmp_path_factory):
    """The storage initializer, predictor, transformer and watch containers, up and answering."""
    objects, root = served["objects"], tmp_path_factory.mktemp("chain")
    started = Containers(docker_client, image)
    ports = {name: free_port() for name in ("predictor", "transformer", "explainer", "grpc", "watch", "dead_letters", "sink")}
    try:
        # 1. The init container: KServe runs it with args [storageUri, /mnt/models] and the storage Secret's keys.
        models = writable_folder(root / "models")
        isvc = next(o for o in objects if o["kind"] == "InferenceService")
        storage_uri = isvc["spec"]["predictor"]["model"]["storageUri"]
        initializer = started.serving([storage_uri, "/mnt/models"], entrypoint=["python3", "-c", INITIALIZER],
                                      mounts=[Mount("/mnt/models", str(models), type="bind")], environment=s3_server.env)
        assert initializer.wait(timeout=120)["StatusCode"] == 0, initializer.logs().decode()[-3000:]
        landed = sorted(str(p.relative_to(models)) for p in models.rglob("*") if p.is_file())

        # 2. The predictor: the rendered args, /mnt/models read-only, no credentials.
        predictor = started.serving(
            replaced(args_of(objects, "InferenceService", MODEL, "predictor"), host="127.0.0.1", http_port=str(ports["predictor"])),
            mounts=[Mount("/mnt/models", str(models), type="bind", read_only=True)])

        # 3. The watch: the rendered args, its sink an HTTP server of the test's (the Broker's place).
        state = writable_folder(root / "watch-state")
        policy_file = root / "policy.yaml"
        policy_file.write_text(next(o for o in objects if o["kind"] == "ConfigMap")["data"]["policy.yaml"])
        sink_token = root / "broker-token"
        sink_token.write_text("the-watch-broker-token\n")
        watch = started.serving(
            replaced(args_of(objects, "Deployment", f"{MODEL}-watch"), host="127.0.0.1", http_port=str(ports["watch"]),
                     dead_letter_port=str(ports["dead_letters"]), sink=f"http://127.0.0.1:{ports['sink']}/")
            + ["--oidc-issuer-url", "http://127.0.0.1:9"],
            mounts=[Mount("/var/lib/kfloop", str(state), type="bind"),
                    Mount("/etc/kfloop/policy.yaml", str(policy_file), type="bind", read_only=True),
                    Mount("/var/run/secrets/kfloop/broker/token", str(sink_token), type="bind", read_only=True)],
            environment=s3_server.env)

        # 4. The transformer: the rendered args plus what KServe appends, and the payload logger's URL.
        transformer_args = replaced(args_of(objects, "InferenceService", MODEL, "transformer"), host="127.0.0.1",
                                    http_port=str(ports["transformer"]))
        transformer_args.remove("--no-grpc")
        transformer = started.serving(
            transformer_args + ["--grpc-port", str(ports["grpc"]), "--model_name", MODEL,
                                "--predictor_host", f"127.0.0.1:{ports['predictor']}",
                                "--logger-url", f"http://127.0.0.1:{ports['watch']}/"],
            environment=s3_server.env)
        # 5. The explainer: the rendered args plus what KServe appends to a custom explainer's (model name,
        # predictor host, http port), no logger.
        explainer = started.serving(
            replaced(args_of(objects, "InferenceService", MODEL, "explainer"), host="127.0.0.1", http_port="8080")
            + ["--model_name", MODEL, "--predictor_host", f"127.0.0.1:{ports['predictor']}",
               "--http_port", str(ports["explainer"])],
            environment=s3_server.env)
        for port, container in ((ports["predictor"], predictor), (ports["transformer"], transformer), (ports["watch"], watch),
                                (ports["explainer"], explainer)):
            wait_ready(f"http://127.0.0.1:{port}/healthz" if container is watch else f"http://127.0.0.1:{port}/v2/health/ready", container)
        yield {"ports": ports, "landed": landed, "containers": started, "watch": watch, "objects": objects}
    finally:
        started.remove_all()


def test_the_storage_initializer_fills_mnt_models_with_exactly_the_version(chain):
    assert chain["landed"] == ["metadata.json", "model.joblib", "model.onnx", "preprocessor.joblib", "reference.npz"]


def test_the_serving_containers_run_as_the_manifests_say(chain, docker_client):
    for container in chain["containers"].started[1:]:
        config = docker_client.api.inspect_container(container.id)
        assert config["Config"]["User"] == "10001:10001"
        assert config["HostConfig"]["ReadonlyRootfs"] is True and config["HostConfig"]["CapDrop"] == ["ALL"]
    predictor = chain["containers"].started[1]
    assert not [e for e in docker_client.api.inspect_container(predictor.id)["Config"]["Env"] if e.startswith("AWS_")]


def test_v1_v2_and_grpc_through_the_containers_equal_the_local_runtime(chain, served, tmp_path):
    from kserve import InferenceGRPCClient, InferInput, InferRequest

    rows = served["rows"]

    def answers(rest: str, grpc: str) -> tuple[list, list, list]:
        by_v1 = httpx.post(f"{rest}/v1/models/{MODEL}:predict", json={"instances": rows.tolist()}, timeout=30)
        body = {"inputs": [{"name": "features", "shape": list(rows.shape), "datatype": "FP32",
                            "data": rows.astype(np.float32).ravel().tolist()}]}
        by_v2 = httpx.post(f"{rest}/v2/models/{MODEL}/infer", json=body, timeout=30)
        assert by_v1.status_code == by_v2.status_code == 200, (by_v1.text, by_v2.text)

        async def grpc_call():
            request = InferRequest(model_name=MODEL, infer_inputs=[InferInput("features", list(rows.shape), "FP32")])
            request.inputs[0].set_data_from_numpy(rows.astype(np.float32))
            client = InferenceGRPCClient(grpc)
            try:
                return await client.infer(request)
            finally:
                await client.close()

        by_grpc = asyncio.run(grpc_call())
        v2_outputs = {o["name"]: o["data"] for o in by_v2.json()["outputs"]}
        grpc_outputs = {o.name: o.as_numpy().tolist() for o in by_grpc.outputs}
        grpc_labels = [label.decode() for label in grpc_outputs["label"]]
        return by_v1.json()["predictions"], v2_outputs, [grpc_labels, grpc_outputs.get("probabilities")]

    ports = chain["ports"]
    in_containers = answers(f"http://127.0.0.1:{ports['transformer']}", f"127.0.0.1:{ports['grpc']}")
    runtime = ServingRuntime(str(served["local"].root), MODEL, home=tmp_path / "home", replicas=1,
                             http_port=free_port(), grpc_port=free_port(), log_dir=tmp_path / "logs")
    with runtime:
        local = answers(runtime.endpoints["rest"], runtime.endpoints["grpc"])
    assert in_containers == local
    assert len(set(in_containers[0])) > 1  # real predictions, not one class for every row


def test_explain_sent_to_the_explainer_container_as_kserve_routes_it_equals_the_transformers(chain, served):
    ports, rows = chain["ports"], served["rows"][:3]
    body = {"instances": rows.tolist(), "top_k": 0}
    by_explainer = httpx.post(f"http://127.0.0.1:{ports['explainer']}/v1/models/{MODEL}:explain", json=body, timeout=120)
    by_transformer = httpx.post(f"http://127.0.0.1:{ports['transformer']}/v1/models/{MODEL}:explain", json=body, timeout=120)
    assert by_explainer.status_code == by_transformer.status_code == 200, (by_explainer.text, by_transformer.text)
    assert by_explainer.json() == by_transformer.json()
    for explanation in by_explainer.json()["explanations"]:
        [explained] = explanation["classes"]
        assert explanation["method"] == "exact" and explanation["version"] == "1"
        assert abs(sum(explained["attributions"].values()) + explained["base_value"] - explained["probability"]) < 1e-6


def test_the_transformers_payload_events_reach_the_watch_container(chain, served):
    ports = chain["ports"]
    before = httpx.get(f"http://127.0.0.1:{ports['watch']}/metrics").text
    rows = served["rows"][:5]
    answer = httpx.post(f"http://127.0.0.1:{ports['transformer']}/v1/models/{MODEL}:predict",
                        json={"instances": rows.tolist()}, timeout=30)
    assert answer.status_code == 200
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        metrics = httpx.get(f"http://127.0.0.1:{ports['watch']}/metrics").text
        if scored(metrics) >= scored(before) + 5:
            break
        time.sleep(0.3)
    assert scored(metrics) >= scored(before) + 5, chain["watch"].logs().decode()[-3000:]


def scored(metrics: str) -> float:
    from kfloop.prometheus_text import sum_samples

    return sum_samples(metrics, "kfloop_watch_rows_scored_total", model=MODEL)


def self_signed_certificate() -> bytes:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key, name = ec.generate_private_key(ec.SECP256R1()), x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cluster CA")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now)
                   .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    return certificate.public_bytes(serialization.Encoding.PEM)


def test_an_alarm_with_the_rendered_credentials_reaches_the_trigger_container(served, s3_server, containers, tmp_path):
    objects = served["objects"]
    issuer = Issuer()
    try:
        port = free_port()
        args = replaced(args_of(objects, "Deployment", f"{MODEL}-trigger"), host="127.0.0.1", http_port=str(port))
        args += ["--oidc-issuer-url", issuer.url]
        audience = args[args.index("--oidc-audience") + 1]
        subject = args[args.index("--oidc-subject") + 1]
        state = writable_folder(tmp_path / "trigger-state")
        policy_file = tmp_path / "policy.yaml"
        policy_file.write_text(next(o for o in objects if o["kind"] == "ConfigMap")["data"]["policy.yaml"])
        # The pod's service account, as Kubernetes mounts it (the API server itself is not reached: no rollout).
        account = tmp_path / "serviceaccount"
        account.mkdir()
        (account / "token").write_text("the-triggers-own-sa-token\n")
        (account / "ca.crt").write_bytes(self_signed_certificate())
        (account / "namespace").write_text(NAMESPACE)
        trigger = containers.serving(
            args, environment={**s3_server.env, "KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(free_port())},
            mounts=[Mount("/var/lib/kfloop", str(state), type="bind"),
                    Mount("/etc/kfloop/policy.yaml", str(policy_file), type="bind", read_only=True),
                    Mount("/var/run/secrets/kubernetes.io/serviceaccount", str(account), type="bind", read_only=True)])
        wait_ready(f"http://127.0.0.1:{port}/healthz", trigger)

        now = int(time.time())
        token = jwt.encode({"iss": ISSUER, "aud": [audience], "sub": subject, "iat": now, "nbf": now, "exp": now + 600},
                           RSA_KEY, algorithm="RS256", headers={"kid": "rsa-1"})
        headers, body = to_binary(CloudEvent({"type": DRIFT_EVENT, "source": f"kfloop/watch/{MODEL}",
                                              "id": str(uuid.uuid4())}, {"model": MODEL, "kind": "drift"}))
        url = f"http://127.0.0.1:{port}/"
        assert httpx.post(url, headers=headers, content=body, timeout=30).status_code == 401
        answer = httpx.post(url, headers={**headers, "authorization": f"Bearer {token}"}, content=body, timeout=30)
        assert answer.status_code == 202, answer.text
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            runs = [r for r in httpx.get(f"{url}status").json()["runs"] if r["outcome"] not in ("pending", "running")]
            if runs:
                break
            time.sleep(0.5)
        assert runs and runs[0]["outcome"] == "failed" and runs[0]["charged"] is False, runs
        assert "ml-pipeline.kubeflow.svc.cluster.local" in runs[0]["error"]
    finally:
        issuer.stop()
