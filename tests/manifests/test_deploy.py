"""`kfloop deploy` without a cluster, against an unreachable one, and against a small fake API server that
speaks discovery, server-side apply and InferenceService status."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import socket
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from kfloop.errors import ClusterError
from kfloop.manifests.deploy import Cluster
from kfloop.manifests.render import (
    RECOMMENDED_EVENTING_FEATURES, REQUIRED_EVENTING_FEATURES,
)
from loop_objects import (
    NAMESPACE, REGISTRY, STORAGE_URI, RENDER_ARGS, one, object_id, run_kfloop,
)


# --- kfloop deploy ---------------------------------------------------------------------------


def kube_config(path: Path, server: str, context: str = "kind-kfloop") -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": context,
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "contexts": [{"name": context, "context": {"cluster": "c", "user": "u", "namespace": NAMESPACE}}],
        "users": [{"name": "u", "user": {"token": "not-a-real-token"}}],
    }))
    return path


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_deploy_dry_run_lists_every_object_without_a_cluster(tmp_path, objects):
    result = run_kfloop("deploy", *RENDER_ARGS, "--dry-run", env={"KUBECONFIG": str(tmp_path / "absent")})
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if re.match(r"^│ \d+", line)]
    assert len(rows) == len(objects) == 30
    for row, obj in zip(rows, objects):
        assert obj["kind"] in row and f"{NAMESPACE}/{obj['metadata']['name']}" in row
    assert "dry run: nothing applied" in result.stdout
    # ... and the Knative Eventing features the objects need, with the commands that turn them on.
    features = {line.split("│")[1].strip(): line.split("│")[3].strip() for line in result.stdout.splitlines()
                if re.match(r"^│ [a-z-]+ +│", line)}
    assert features == {"authentication-oidc": "required", "default-authorization-mode": "recommended",
                        "transport-encryption": "recommended"}
    lines = result.stdout.splitlines()
    assert f"required: {PATCH_OIDC}" in lines
    assert "recommended: " + PATCH_OIDC.replace(
        '"authentication-oidc":"enabled"', '"default-authorization-mode":"deny-all","transport-encryption":"permissive"') in lines


def test_deploy_without_a_reachable_cluster_fails_with_one_line_naming_the_kube_context(tmp_path):
    port = closed_port()
    config = kube_config(tmp_path / "config", f"http://127.0.0.1:{port}")
    result = run_kfloop("deploy", *RENDER_ARGS, env={"KUBECONFIG": str(config)})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: cannot reach the cluster of kube context 'kind-kfloop' (http://127.0.0.1:{port}): connection refused"]


def test_deploy_without_a_kube_config_says_where_it_looked(tmp_path):
    result = run_kfloop("deploy", *RENDER_ARGS, env={"KUBECONFIG": str(tmp_path / "absent")})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: no kube config found at {tmp_path / 'absent'}: set KUBECONFIG or give --context"]


def test_an_unknown_context_is_named_with_the_ones_that_exist(tmp_path):
    config = kube_config(tmp_path / "config", "http://127.0.0.1:1")
    result = run_kfloop("deploy", *RENDER_ARGS, "--context", "prod", env={"KUBECONFIG": str(config)})
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: kube context 'prod' is not in {config} (it has: kind-kfloop)"


class FakeApiServer:
    """Just enough of a Kubernetes API server: discovery, GET, server-side apply, InferenceService status.

    Apply keeps ``resourceVersion`` when nothing changes (as the real one does);
    the InferenceService turns Ready on the ``ready_at``-th GET after an apply.
    Knative Eventing's ConfigMap knative-eventing/config-features holds ``features``
    (none: the ConfigMap does not exist); with ``features_forbidden`` reading it gets 403.
    """

    def __init__(self, kinds: list[tuple[str, str]], *, missing_groups: tuple[str, ...] = (), ready_at: int = 3,
                 features: dict[str, str] | None = None, features_forbidden: bool = False) -> None:
        self.resources: dict[str, list[dict[str, Any]]] = {}
        for api_version, kind in sorted(set(kinds)):
            if api_version.rpartition("/")[0] in missing_groups:
                continue
            plural = kind.lower() + ("" if kind.endswith("s") else "s")
            plural = plural.replace("policys", "policies")
            self.resources.setdefault(api_version, []).append(
                {"name": plural, "singularName": kind.lower(), "namespaced": True, "kind": kind,
                 "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]})
        self.store: dict[str, dict[str, Any]] = {}
        self.features_path = "/api/v1/namespaces/knative-eventing/configmaps/config-features"
        self.features_forbidden = features_forbidden
        if features is not None:
            self.store[self.features_path] = {"apiVersion": "v1", "kind": "ConfigMap", "data": features, "metadata": {
                "name": "config-features", "namespace": "knative-eventing", "resourceVersion": "1", "uid": "u-features"}}
        self.version = 0
        self.ready_at = ready_at
        self.isvc_reads = 0
        self.applied: list[str] = []
        self.lock = threading.Lock()
        handler = self._handler()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self._drop_discovery_cache()

    def _drop_discovery_cache(self) -> None:
        digest = hashlib.md5(self.url.encode(), usedforsecurity=False).hexdigest()
        Path(tempfile.gettempdir(), f"osrcp-{digest}.json").unlink(missing_ok=True)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._drop_discovery_cache()

    def _discovery(self, path: str) -> Any:
        if path == "/version":
            return {"major": "1", "minor": "30", "gitVersion": "v1.30.0"}
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"]}
        if path == "/apis":
            groups = sorted({v.rpartition("/")[0] for v in self.resources if "/" in v})
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": g, "versions": [{"groupVersion": v, "version": v.rpartition("/")[2]} for v in self.resources if v.startswith(g + "/")],
                 "preferredVersion": next({"groupVersion": v, "version": v.rpartition("/")[2]} for v in self.resources if v.startswith(g + "/"))}
                for g in groups]}
        version = path.removeprefix("/api/").removeprefix("/apis/")
        if version in self.resources:
            return {"kind": "APIResourceList", "groupVersion": version, "resources": self.resources[version]}
        return None

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _missing(self, path: str) -> None:
                self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                                 "message": f"{path} not found", "code": 404})

            def do_GET(self) -> None:  # noqa: N802
                path = urlsplit(self.path).path
                found = fake._discovery(path)
                if found is not None:
                    return self._send(200, found)
                if path == fake.features_path and fake.features_forbidden:
                    return self._send(403, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403,
                                            "message": 'configmaps "config-features" is forbidden: User cannot get resource "configmaps"'})
                with fake.lock:
                    obj = copy.deepcopy(fake.store.get(path))
                    if obj is not None and obj["kind"] == "InferenceService":
                        fake.isvc_reads += 1
                        obj["status"] = fake._isvc_status(obj)
                if obj is None:
                    return self._missing(path)
                self._send(200, obj)

            def do_PATCH(self) -> None:  # noqa: N802
                url = urlsplit(self.path)
                assert self.headers["content-type"] == "application/apply-patch+yaml"
                query = parse_qs(url.query)
                assert query["fieldManager"] == ["kfloop"] and query["force"] == ["True"]
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with fake.lock:
                    before = fake.store.get(url.path)
                    after = fake._apply(before, body)
                    if query.get("dryRun") != ["All"]:
                        fake.store[url.path] = after
                        fake.applied.append(f"{body['kind']}/{body['metadata']['name']}")
                        if body["kind"] == "InferenceService":
                            fake.isvc_reads = 0
                self._send(201 if before is None else 200, after)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    def _apply(self, before: dict[str, Any] | None, body: dict[str, Any]) -> dict[str, Any]:
        content = {k: v for k, v in body.items() if k != "metadata"}
        if before is not None and {k: v for k, v in before.items() if k not in ("metadata", "status")} == content \
                and before["metadata"].get("labels") == body["metadata"].get("labels"):
            return copy.deepcopy(before)
        self.version += 1
        generation = (before or {}).get("metadata", {}).get("generation", 0) + 1
        return {**copy.deepcopy(body), "metadata": {**body["metadata"], "resourceVersion": str(self.version),
                                                    "generation": generation, "uid": "u-" + body["metadata"]["name"]}}

    def _isvc_status(self, isvc: dict[str, Any]) -> dict[str, Any]:
        ready = self.isvc_reads >= self.ready_at
        state = "True" if ready else "False"
        return {"observedGeneration": isvc["metadata"]["generation"], "url": f"http://{isvc['metadata']['name']}.{NAMESPACE}.example.com",
                "conditions": [
                    {"type": "PredictorReady", "status": "True" if self.isvc_reads >= 2 else "False",
                     **({} if self.isvc_reads >= 2 else {"reason": "MinimumReplicasUnavailable", "message": "Deployment does not have minimum availability."})},
                    {"type": "TransformerReady", "status": state},
                    {"type": "IngressReady", "status": state},
                    {"type": "Ready", "status": state},
                ]}


OIDC_ON = {"authentication-oidc": "enabled", "default-authorization-mode": "deny-all", "transport-encryption": "permissive"}
PATCH_OIDC = """kubectl -n knative-eventing patch configmap config-features --type merge -p '{"data":{"authentication-oidc":"enabled"}}'"""


@pytest.fixture
def fake_cluster(objects):
    servers = []

    def start(**options: Any) -> FakeApiServer:
        options.setdefault("features", OIDC_ON)
        server = FakeApiServer([(o["apiVersion"], o["kind"]) for o in objects], **options)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def test_apply_reports_created_then_unchanged_then_configured(objects, fake_cluster, tmp_path, monkeypatch):
    server = fake_cluster()
    monkeypatch.setenv("KUBECONFIG", str(kube_config(tmp_path / "config", server.url)))
    cluster = Cluster.connect()
    assert (cluster.context, cluster.server) == ("kind-kfloop", server.url)
    assert {c.action for c in cluster.apply(objects)} == {"created"}
    assert server.applied == [object_id(o) for o in objects]  # in render order
    assert {c.action for c in cluster.apply(objects)} == {"unchanged"}
    changed = copy.deepcopy(objects)
    one(changed, "InferenceService")["spec"]["predictor"]["model"]["storageUri"] = f"{REGISTRY}/classifier/2"
    actions = {f"{c.kind}/{c.name}": c.action for c in cluster.apply(changed, dry_run=True)}
    assert actions.pop("InferenceService/classifier") == "configured" and set(actions.values()) == {"unchanged"}
    assert server.store[f"/apis/serving.kserve.io/v1beta1/namespaces/{NAMESPACE}/inferenceservices/classifier"]["spec"]["predictor"]["model"]["storageUri"] == STORAGE_URI
    actions = {f"{c.kind}/{c.name}": c.action for c in cluster.apply(changed)}
    assert actions["InferenceService/classifier"] == "configured"


def test_wait_ready_reports_each_conditions_change_until_ready_and_times_out_naming_what_is_pending(objects, fake_cluster, tmp_path, monkeypatch):
    server = fake_cluster(ready_at=3)
    monkeypatch.setenv("KUBECONFIG", str(kube_config(tmp_path / "config", server.url)))
    cluster = Cluster.connect()
    cluster.apply(objects)
    seen = []
    isvc = cluster.wait_ready(NAMESPACE, "classifier", 30, on_progress=lambda c, m: seen.append((dict(c), m)), poll_seconds=0.01)
    assert isvc["status"]["conditions"][-1] == {"type": "Ready", "status": "True"}
    assert seen[0] == ({"PredictorReady": "False", "TransformerReady": "False", "IngressReady": "False", "Ready": "False"},
                       "Deployment does not have minimum availability.")
    assert seen[-1] == ({"PredictorReady": "True", "TransformerReady": "True", "IngressReady": "True", "Ready": "True"},
                        "all conditions True")
    server.ready_at = 10**9
    cluster.apply([{**o, "metadata": {**o["metadata"], "labels": {**o["metadata"]["labels"], "x": "y"}}}
                   for o in objects if o["kind"] == "InferenceService"])
    clock = iter(range(0, 1000, 5))
    with pytest.raises(ClusterError) as caught:
        cluster.wait_ready(NAMESPACE, "classifier", 10, clock=lambda: next(clock), sleep=lambda s: None)
    assert str(caught.value) == (
        f"InferenceService {NAMESPACE}/classifier in kube context 'kind-kfloop' is not Ready after 10 s "
        "(TransformerReady=False, IngressReady=False, Ready=False): waiting for TransformerReady, IngressReady, Ready")


def test_a_cluster_without_kserve_is_told_what_to_install(objects, fake_cluster, tmp_path, monkeypatch):
    server = fake_cluster(missing_groups=("serving.kserve.io",))
    monkeypatch.setenv("KUBECONFIG", str(kube_config(tmp_path / "config", server.url)))
    with pytest.raises(ClusterError) as caught:
        Cluster.connect().apply(objects)
    assert str(caught.value) == "the cluster of kube context 'kind-kfloop' has no ServingRuntime (serving.kserve.io/v1alpha1): install KServe"


def test_kfloop_deploy_applies_waits_and_reports_what_changed(objects, fake_cluster, tmp_path):
    server = fake_cluster(ready_at=2)
    env = {"KUBECONFIG": str(kube_config(tmp_path / "config", server.url))}
    first = run_kfloop("deploy", *RENDER_ARGS, "--timeout", "60", env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("created") == len(objects)
    assert "30 created, 0 configured, 0 unchanged" in first.stderr
    assert "warning" not in first.stderr
    assert f"InferenceService {NAMESPACE}/classifier is Ready at http://classifier.{NAMESPACE}.example.com" in first.stderr
    second = run_kfloop("deploy", *RENDER_ARGS, "--timeout", "0", env=env)
    assert second.returncode == 0, second.stderr
    assert "0 created, 0 configured, 30 unchanged" in second.stderr


@pytest.mark.parametrize("features, shown", [
    ({"authentication-oidc": "disabled"}, "'disabled'"),
    ({"transport-encryption": "strict"}, "not set (Knative's default applies)"),
    (None, "not set (Knative's default applies)"),  # no ConfigMap: every flag has its default
])
def test_kfloop_deploy_refuses_in_one_line_while_knatives_oidc_is_off_and_applies_nothing(fake_cluster, tmp_path, features, shown):
    server = fake_cluster(features=features)
    result = run_kfloop("deploy", *RENDER_ARGS, "--timeout", "0", env={"KUBECONFIG": str(kube_config(tmp_path / "config", server.url))})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [(
        f"error: Knative Eventing's feature authentication-oidc is {shown} in kube context 'kind-kfloop' "
        f"(ConfigMap knative-eventing/config-features); the loop needs 'enabled': {PATCH_OIDC}")]
    assert server.applied == []


def test_kfloop_deploy_warns_about_recommended_features_and_applies(fake_cluster, tmp_path, objects):
    server = fake_cluster(features={"authentication-oidc": "Enabled", "transport-encryption": "strict"})
    result = run_kfloop("deploy", *RENDER_ARGS, "--timeout", "0", env={"KUBECONFIG": str(kube_config(tmp_path / "config", server.url))})
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    patch = PATCH_OIDC.replace('"authentication-oidc":"enabled"', '"default-authorization-mode":"deny-all"')
    assert warnings == [(
        "warning: Knative Eventing's feature default-authorization-mode is not set (Knative's default applies) in kube context "
        f"'kind-kfloop'; recommended: 'deny-all' ({patch})")]
    assert server.applied == [object_id(o) for o in objects]


def test_a_kube_context_that_cannot_read_knatives_features_is_warned_not_refused(fake_cluster, tmp_path, monkeypatch):
    server = fake_cluster(features_forbidden=True)
    monkeypatch.setenv("KUBECONFIG", str(kube_config(tmp_path / "config", server.url)))
    cluster = Cluster.connect()
    assert cluster.eventing_features() is None
    assert cluster.check_eventing_features(REQUIRED_EVENTING_FEATURES, RECOMMENDED_EVENTING_FEATURES) == [(
        "cannot read ConfigMap knative-eventing/config-features in kube context 'kind-kfloop' to check that "
        f"authentication-oidc=enabled (a cluster admin runs: {PATCH_OIDC})")]
