"""The loop on a cluster: rendered objects validate, are locked down, agree with the pipeline, and deploy.

No cluster is needed: schemas come from ../shared/specs (CRDs) and kubernetes-validate
(core kinds); ``deploy`` is exercised against an unreachable address and against a small
fake API server that speaks discovery, server-side apply and InferenceService status.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, urlsplit

import kubernetes_validate
import pytest
import typer
import yaml
from kubernetes_validate import utils as kv_utils

from kfloop.errors import ClusterError, ManifestError
from kfloop.manifests.deploy import Cluster
from kfloop.manifests.render import (
    BROKER_TOKEN_PATH, DEAD_LETTER_PORT, KFP_TOKEN_SECRET, RECOMMENDED_EVENTING_FEATURES, REQUIRED_EVENTING_FEATURES,
    STORAGE_READONLY_SECRET, STORAGE_SECRET, broker_audience, broker_ingress_url, knative_child_name, render_objects,
    trigger_subject,
)
from kfloop.manifests.schemas import validate_manifest
from kfloop.policies import load_policy
from kfloop.event_types import ALARM_EVENTS, LABEL_EVENT, REQUEST_EVENT

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "manifests" / "base"
OVERLAYS = REPO / "manifests" / "overlays"
# The values manifests/base was rendered with (docs/cluster.md shows the same command).
NAMESPACE = "kfloop"
IMAGE = "ghcr.io/kfloop/kfloop:0.1.0"
REGISTRY = "s3://kfloop/registry"
STORAGE_URI = f"{REGISTRY}/classifier/1/"
PROMETHEUS = "http://prometheus-operated.monitoring.svc.cluster.local:9090"
RENDER_ARGS = ["--namespace", NAMESPACE, "--storage-uri", STORAGE_URI, "--registry", REGISTRY, "--prometheus-url", PROMETHEUS]
CRD_KINDS = {"InferenceService", "ScaledObject", "Broker", "Trigger", "EventPolicy"}  # those whose CRD ../shared/specs holds
NO_CRD_HERE = {"ServingRuntime", "PodMonitor"}  # checked by hand below
CORE_KINDS = {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "NetworkPolicy", "Deployment", "Service",
              "PodDisruptionBudget", "PersistentVolumeClaim"}
K8S_VERSIONS = ["1.30", ".".join(kv_utils.latest_version().split(".")[:2])]
CREDENTIAL_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|API_KEY|PRIVATE", re.IGNORECASE)


@pytest.fixture(scope="module")
def policy():
    return load_policy()


def render(policy, **overrides: Any) -> list[dict[str, Any]]:
    values = {"namespace": NAMESPACE, "image": IMAGE, "storage_uri": STORAGE_URI, "registry_uri": REGISTRY,
              "prometheus_url": PROMETHEUS, **overrides}
    return render_objects(policy, **values)


@pytest.fixture(scope="module")
def objects(policy):
    return render(policy)


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


LABELS_TRIGGER = "classifier-watch-labels"


def alarm_triggers(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Triggers that deliver alarms to the trigger service (every Trigger but the labels one)."""
    return [o for o in objects if o["kind"] == "Trigger" and o["metadata"]["name"] != LABELS_TRIGGER]


def object_id(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


# --- schemas ---------------------------------------------------------------------------------


def test_the_loop_has_every_kind_the_issue_asks_for_and_nothing_else(objects):
    kinds = sorted({o["kind"] for o in objects})
    assert kinds == sorted(CRD_KINDS | NO_CRD_HERE | (CORE_KINDS - {"PersistentVolumeClaim"}))
    assert len({object_id(o) for o in objects}) == len(objects)
    assert all(o["metadata"]["namespace"] == NAMESPACE for o in objects)


def test_every_custom_resource_matches_its_upstream_crd_with_unknown_fields_rejected(objects, shared_specs):
    checked = [o for o in objects if o["kind"] in CRD_KINDS]
    assert len(checked) == 9  # InferenceService, ScaledObject, Broker, 2 EventPolicies, 3 alarm Triggers, the labels one
    for obj in checked:
        validate_manifest(obj, shared_specs)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_core_object_validates_strictly_against_kubernetes(objects, version):
    checked = [o for o in objects if o["kind"] in CORE_KINDS]
    assert len(checked) == 17
    for obj in checked:
        kubernetes_validate.validate(obj, version, strict=True)


def test_a_misspelt_field_fails_both_validators(objects, shared_specs):
    isvc = copy.deepcopy(one(objects, "InferenceService"))
    isvc["spec"]["transformer"]["loger"] = isvc["spec"]["transformer"].pop("logger")
    with pytest.raises(ManifestError, match="loger"):
        validate_manifest(isvc, shared_specs)
    deployment = copy.deepcopy(one(objects, "Deployment", "classifier-watch"))
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesytem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


def test_the_serving_runtime_declares_what_the_inference_service_asks_for(objects):
    """No ServingRuntime CRD in ../shared/specs: its container is validated as a core Container, the rest by hand."""
    runtime, isvc = one(objects, "ServingRuntime"), one(objects, "InferenceService")
    model = isvc["spec"]["predictor"]["model"]
    assert set(runtime["spec"]) == {"supportedModelFormats", "protocolVersions", "containers"}
    assert model["runtime"] == runtime["metadata"]["name"]
    assert [{k: f[k] for k in ("name", "version")} for f in runtime["spec"]["supportedModelFormats"]] == [model["modelFormat"]]
    assert runtime["spec"]["supportedModelFormats"][0]["autoSelect"] is False
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"  # the name KServe merges runtime and InferenceService containers by
    assert container == {k: v for k, v in model.items() if k not in ("modelFormat", "runtime", "protocolVersion", "storageUri")}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "runtime-check"},
           "spec": {"containers": [container], "volumes": isvc["spec"]["predictor"]["volumes"]}}
    kubernetes_validate.validate(pod, K8S_VERSIONS[0], strict=True)


def test_the_pod_monitor_scrapes_a_named_port_that_every_pod_of_the_loop_has(objects):
    """No PodMonitor CRD in ../shared/specs: its few fields are checked against the pods they select."""
    monitor = one(objects, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) == {"selector", "podMetricsEndpoints"}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint == {"port": "http", "path": "/metrics", "interval": "15s"}
    wanted = monitor["spec"]["selector"]["matchLabels"]
    pods = list(workloads(objects))
    assert {where for where, _, _ in pods} >= {"Deployment/classifier-watch", "Deployment/classifier-trigger",
                                               "InferenceService/classifier.predictor", "InferenceService/classifier.transformer"}
    for where, pod, containers in pods:
        if where.startswith("ServingRuntime"):
            continue  # a template: its pods are the InferenceService predictor's
        assert wanted.items() <= pod["labels"].items(), where
        assert any(p["name"] == "http" and p["containerPort"] == 8080 for c in containers for p in c["ports"]), where


# --- security --------------------------------------------------------------------------------


def workloads(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], list[dict[str, Any]]]]:
    """(where, pod-level fields, containers) of every pod template the objects describe."""
    for obj in objects:
        where = object_id(obj)
        if obj["kind"] == "Deployment":
            template = obj["spec"]["template"]
            yield where, {**template["spec"], "labels": template["metadata"].get("labels", {})}, template["spec"]["containers"]
        elif obj["kind"] == "InferenceService":
            for component in ("predictor", "transformer", "explainer"):
                spec = obj["spec"].get(component)
                if spec is None:
                    continue
                containers = list(spec.get("containers", []))
                if "model" in spec:
                    containers.append({k: v for k, v in spec["model"].items()
                                       if k not in ("modelFormat", "runtime", "protocolVersion", "storageUri")})
                yield f"{where}.{component}", spec, containers
        elif obj["kind"] == "ServingRuntime":
            yield where, {}, obj["spec"]["containers"]


def security_problems(objects: list[dict[str, Any]]) -> list[str]:
    """Everything that breaks the issue's rules for workloads, RBAC and secrets."""
    problems = []
    for where, pod, containers in workloads(objects):
        pod_security = pod.get("securityContext", {})
        for container in containers:
            at = f"{where}:{container.get('name')}"
            security = container.get("securityContext", {})
            for key, wanted in (("runAsNonRoot", True), ("readOnlyRootFilesystem", True), ("allowPrivilegeEscalation", False)):
                if security.get(key, pod_security.get(key) if key == "runAsNonRoot" else None) is not wanted:
                    problems.append(f"{at}: {key} is not {wanted}")
            if "ALL" not in security.get("capabilities", {}).get("drop", []):
                problems.append(f"{at}: capabilities do not drop ALL")
            if security.get("capabilities", {}).get("add"):
                problems.append(f"{at}: adds capabilities")
            if (security.get("seccompProfile") or pod_security.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
                problems.append(f"{at}: seccompProfile is not RuntimeDefault")
            if security.get("privileged"):
                problems.append(f"{at}: privileged")
            image = container.get("image", "")
            reference, _, digest = image.partition("@")
            tag = reference.rsplit("/", 1)[-1].partition(":")[2]
            if not digest and tag in ("", "latest"):
                problems.append(f"{at}: image {image!r} is untagged or latest")
            for variable in container.get("env", []):
                if "value" in variable and CREDENTIAL_NAME.search(variable["name"]):
                    problems.append(f"{at}: credential {variable['name']} inline")
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            home = next((v["value"] for v in container.get("env", []) if v["name"] == "HOME"), None)
            if "/tmp" not in mounts or home not in mounts:
                problems.append(f"{at}: no writable /tmp and HOME on a read-only root")
            resources = container.get("resources", {})
            if not resources.get("requests") or not resources.get("limits"):
                problems.append(f"{at}: no resource requests and limits")
    for obj in objects:
        where = object_id(obj)
        if obj["kind"] in ("ClusterRole", "ClusterRoleBinding"):
            problems.append(f"{where}: cluster-wide RBAC")
        if obj["kind"] == "Secret":
            problems.append(f"{where}: a Secret is rendered (credentials must be referenced, not shipped)")
        if obj["kind"] == "Role":
            for rule in obj.get("rules", []):
                for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                    if "*" in rule.get(field, []):
                        problems.append(f"{where}: wildcard in {field}")
        if obj["kind"] == "RoleBinding" and obj["roleRef"]["kind"] != "Role":
            problems.append(f"{where}: binds a {obj['roleRef']['kind']}")
    return problems


def test_every_workload_and_rbac_object_is_locked_down(objects):
    assert security_problems(objects) == []
    assert len(list(workloads(objects))) == 5


@pytest.mark.parametrize("break_it, expected", [
    (lambda o: one(o, "Deployment", "classifier-watch")["spec"]["template"]["spec"]["containers"][0]["securityContext"].pop("readOnlyRootFilesystem"),
     "Deployment/classifier-watch:watch: readOnlyRootFilesystem is not True"),
    (lambda o: one(o, "InferenceService")["spec"]["transformer"]["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True),
     "InferenceService/classifier.transformer:kserve-container: allowPrivilegeEscalation is not False"),
    (lambda o: one(o, "InferenceService")["spec"]["predictor"]["model"]["securityContext"]["capabilities"].update(drop=["NET_RAW"]),
     "InferenceService/classifier.predictor:kserve-container: capabilities do not drop ALL"),
    (lambda o: one(o, "ServingRuntime")["spec"]["containers"][0]["securityContext"].pop("seccompProfile"),
     "ServingRuntime/classifier-runtime:kserve-container: seccompProfile is not RuntimeDefault"),
    (lambda o: one(o, "Deployment", "classifier-trigger")["spec"]["template"]["spec"]["containers"][0].update(image="ghcr.io/kfloop/kfloop:latest"),
     "Deployment/classifier-trigger:trigger: image 'ghcr.io/kfloop/kfloop:latest' is untagged or latest"),
    (lambda o: one(o, "InferenceService")["spec"]["transformer"]["containers"][0].update(image="localhost:5000/kfloop"),
     "InferenceService/classifier.transformer:kserve-container: image 'localhost:5000/kfloop' is untagged or latest"),
    (lambda o: one(o, "Deployment", "classifier-watch")["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"}),
     "Deployment/classifier-watch:watch: credential AWS_SECRET_ACCESS_KEY inline"),
    (lambda o: one(o, "Role")["rules"][0]["verbs"].append("*"), "Role/classifier-trigger: wildcard in verbs"),
    (lambda o: one(o, "Role")["rules"][1]["resources"].append("*"), "Role/classifier-trigger: wildcard in resources"),
    (lambda o: one(o, "Role").update(kind="ClusterRole"), "ClusterRole/classifier-trigger: cluster-wide RBAC"),
    (lambda o: o.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3"}, "stringData": {"k": "v"}}),
     "Secret/s3: a Secret is rendered (credentials must be referenced, not shipped)"),
])
def test_the_security_walk_fails_on_each_kind_of_weakness(objects, break_it, expected):
    broken = copy.deepcopy(objects)
    break_it(broken)
    assert expected in security_problems(broken)


def reachable_secrets(objects: list[dict[str, Any]], pod: dict[str, Any], containers: list[dict[str, Any]]) -> set[str]:
    """Every Secret a pod's processes can read: env, envFrom, volumes, and those its ServiceAccount lists.

    The ServiceAccount's ``secrets`` are what KServe's storage initializer (an init
    container of the predictor's pod) takes its credentials from.
    """
    names = set()
    for container in containers:
        names |= {source["secretRef"]["name"] for source in container.get("envFrom", []) if "secretRef" in source}
        names |= {variable["valueFrom"]["secretKeyRef"]["name"] for variable in container.get("env", [])
                  if "secretKeyRef" in variable.get("valueFrom", {})}
    for volume in pod.get("volumes", []):
        if "secret" in volume:
            names.add(volume["secret"]["secretName"])
        names |= {source["secret"]["name"] for source in volume.get("projected", {}).get("sources", []) if "secret" in source}
    account = one(objects, "ServiceAccount", pod["serviceAccountName"])
    names |= {secret["name"] for secret in account.get("secrets", []) + account.get("imagePullSecrets", [])}
    return names


def test_the_client_facing_pods_reach_only_the_read_only_storage_secret(objects):
    reached = {where: reachable_secrets(objects, pod, containers)
               for where, pod, containers in workloads(objects) if not where.startswith("ServingRuntime")}
    assert reached == {
        "InferenceService/classifier.predictor": {STORAGE_READONLY_SECRET},  # KServe's storage initializer
        "InferenceService/classifier.transformer": {STORAGE_READONLY_SECRET},  # preprocessors from the registry
        "Deployment/classifier-watch": {STORAGE_SECRET},  # writes captures
        "Deployment/classifier-trigger": {STORAGE_SECRET, KFP_TOKEN_SECRET},  # moves the production pointer
    }
    # ... and no pod may fetch another Secret through the Kubernetes API.
    for role in (o for o in objects if o["kind"] in ("Role", "ClusterRole")):
        assert all("secrets" not in rule["resources"] and "*" not in rule["resources"] for rule in role["rules"])


def test_credentials_reach_the_pods_only_by_secret_reference(objects):
    serving = one(objects, "ServiceAccount", "classifier-serving")
    assert serving["secrets"] == [{"name": STORAGE_READONLY_SECRET}]  # KServe's storage initializer reads these
    for where, _, containers in workloads(objects):
        for container in containers:
            if where.endswith("predictor") or where.startswith("ServingRuntime"):
                assert "envFrom" not in container  # the predictor reads /mnt/models only
            elif where.endswith("transformer"):
                assert container["envFrom"] == [{"secretRef": {"name": STORAGE_READONLY_SECRET}}], where
            else:
                assert container["envFrom"] == [{"secretRef": {"name": STORAGE_SECRET}}], where
    token = [v for v in one(objects, "Deployment", "classifier-trigger")["spec"]["template"]["spec"]["containers"][0]["env"]
             if v["name"] == "KFLOOP_KFP_TOKEN"]
    assert token == [{"name": "KFLOOP_KFP_TOKEN",
                      "valueFrom": {"secretKeyRef": {"name": "kfloop-kfp-token", "key": "token", "optional": True}}}]


def test_only_the_trigger_service_has_rights_on_the_kubernetes_api_and_only_on_its_inference_service(objects):
    accounts = {o["metadata"]["name"]: o["automountServiceAccountToken"] for o in objects if o["kind"] == "ServiceAccount"}
    # The watch's token only reads the cluster's OIDC discovery (every ServiceAccount may), to check dead letters' tokens.
    assert accounts == {"classifier-serving": False, "classifier-watch": True, "classifier-trigger": True,
                        "classifier-labeller": False}
    role, binding = one(objects, "Role"), one(objects, "RoleBinding")
    assert role["rules"][0] == {"apiGroups": ["serving.kserve.io"], "resources": ["inferenceservices"],
                                "resourceNames": ["classifier"], "verbs": ["get", "list", "watch", "patch"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "classifier-trigger", "namespace": NAMESPACE}]
    assert one(objects, "Deployment", "classifier-trigger")["spec"]["template"]["spec"]["serviceAccountName"] == "classifier-trigger"


# --- what the objects say --------------------------------------------------------------------


def cli_command(args: list[str]):
    """The click command of ``kfloop <args[0]>`` and its parsed parameters (nothing runs)."""
    from kfloop.cli import app

    command = typer.main.get_command(app).commands[args[0]]
    return command.make_context(args[0], list(args[1:])).params


def test_every_container_command_line_is_accepted_by_kfloops_cli_as_kserve_extends_it(objects):
    isvc = one(objects, "InferenceService")
    predictor = cli_command(isvc["spec"]["predictor"]["model"]["args"])
    assert (predictor["model_dir"], predictor["model"], predictor["host"], predictor["http_port"], predictor["no_grpc"]) == \
        (Path("/mnt/models"), "classifier", "0.0.0.0", 8080, True)
    # KServe appends these to a custom transformer's arguments (transformer_custom.go).
    injected = ["--model_name", isvc["metadata"]["name"], "--predictor_host", f"classifier-predictor.{NAMESPACE}", "--http_port", "8080"]
    transformer = cli_command(isvc["spec"]["transformer"]["containers"][0]["args"] + injected)
    assert (transformer["model"], transformer["predictor_protocol"], transformer["registry"], transformer["control_port"]) == \
        ("classifier", "v2", REGISTRY, None)  # no control routes: nothing can re-point the transformer
    assert (transformer["predictor_host"], transformer["host"], transformer["http_port"]) == (f"classifier-predictor.{NAMESPACE}", "0.0.0.0", 8080)
    watch = cli_command(one(objects, "Deployment", "classifier-watch")["spec"]["template"]["spec"]["containers"][0]["args"])
    assert (watch["sink"], watch["host"], watch["http_port"], watch["registry"]) == \
        (broker_ingress_url(NAMESPACE, "default"), "0.0.0.0", 8080, REGISTRY)
    assert (str(watch["sink_token_file"]), watch["event_auth"]) == (BROKER_TOKEN_PATH, "none")
    alarms = [o["metadata"]["name"] for o in alarm_triggers(objects)]
    assert (watch["dead_letter_port"], watch["dead_letter_auth"], watch["oidc_audience"], list(watch["oidc_subject"])) == \
        (DEAD_LETTER_PORT, "oidc", f"classifier-watch.{NAMESPACE}",
         [trigger_subject(NAMESPACE, name) for name in [*alarms, LABELS_TRIGGER]])
    trigger = cli_command(one(objects, "Deployment", "classifier-trigger")["spec"]["template"]["spec"]["containers"][0]["args"])
    assert (trigger["inference_service"], trigger["namespace"], trigger["prometheus_url"], trigger["image"], trigger["host"]) == \
        ("classifier", NAMESPACE, PROMETHEUS, IMAGE, "0.0.0.0")
    assert (trigger["alarm_auth"], trigger["oidc_audience"], list(trigger["oidc_subject"]), trigger["kfp_allow_http"]) == \
        ("oidc", f"classifier-trigger.{NAMESPACE}", [trigger_subject(NAMESPACE, name) for name in alarms], True)


def test_the_transformer_names_the_predictor_protocol_and_logs_requests_to_the_watch_service(objects):
    isvc = one(objects, "InferenceService")
    args = isvc["spec"]["transformer"]["containers"][0]["args"]
    assert args[args.index("--predictor_protocol") + 1] == "v2"
    # Straight to the watch's Service (port 80 -> the watch's http port), not through the Broker:
    # KServe 0.20's logger sends no credentials, which an OIDC Broker answers with 401.
    watch = one(objects, "Service", "classifier-watch")
    assert watch["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
                                      {"name": "dead-letters", "port": 8081, "targetPort": "dead-letters", "protocol": "TCP"}]
    assert isvc["spec"]["transformer"]["logger"] == {
        "mode": "request", "url": f"http://classifier-watch.{NAMESPACE}.svc.cluster.local/"}
    watch_pods = one(objects, "Deployment", "classifier-watch")["spec"]["template"]
    assert watch["spec"]["selector"].items() <= watch_pods["metadata"]["labels"].items()
    assert [(p["name"], p["containerPort"]) for p in watch_pods["spec"]["containers"][0]["ports"]] == \
        [("http", 8080), ("dead-letters", DEAD_LETTER_PORT)]
    assert "broker-ingress" not in json.dumps(isvc)
    assert "logger" not in isvc["spec"]["predictor"]  # the drift detector must see raw rows, not scaled ones
    assert isvc["metadata"]["annotations"] == {"serving.kserve.io/deploymentMode": "Standard",
                                               "serving.kserve.io/autoscalerClass": "external"}
    for container in (isvc["spec"]["predictor"]["model"], isvc["spec"]["transformer"]["containers"][0]):
        assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
        assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}


def test_the_compiled_pipeline_and_the_inference_service_agree_on_image_and_storage_layout(policy, objects, tmp_path):
    from kfloop.pipelines.training import compile_training_pipeline

    spec = yaml.safe_load(compile_training_pipeline(policy, tmp_path / "pipeline.yaml", image=IMAGE, registry_uri=REGISTRY).read_text())
    pipeline_images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    root, model = parameters["registry_uri"]["defaultValue"], parameters["model_name"]["defaultValue"]
    assert pipeline_images == {IMAGE}
    served_images = {c["image"] for _, _, containers in workloads(objects) for c in containers}
    assert served_images == pipeline_images
    isvc = one(objects, "InferenceService")
    storage = isvc["spec"]["predictor"]["model"]["storageUri"]
    assert re.fullmatch(re.escape(f"{root}/{model}/") + r"[0-9]+/", storage), storage  # ModelRegistry.uri(model, version)
    assert isvc["metadata"]["name"] == model
    trigger_args = one(objects, "Deployment", "classifier-trigger")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert trigger_args[trigger_args.index("--image") + 1] == IMAGE  # retraining runs submit the same base_image
    for args in (isvc["spec"]["transformer"]["containers"][0]["args"], trigger_args,
                 one(objects, "Deployment", "classifier-watch")["spec"]["template"]["spec"]["containers"][0]["args"]):
        assert args[args.index("--registry") + 1] == root


def test_values_a_cluster_cannot_use_are_all_reported_at_once(policy):
    with pytest.raises(ManifestError) as caught:
        render(policy, namespace="Kfloop", image="ghcr.io/kfloop/kfloop:latest", registry_uri="/home/me/registry",
               storage_uri="s3://elsewhere/classifier/1", prometheus_url="prometheus:9090")
    message = str(caught.value)
    for part in ("namespace 'Kfloop'", "uses 'latest'", "registry '/home/me/registry' must be a s3:// or gs:// URI",
                 "storage URI 's3://elsewhere/classifier/1' must be a version of model 'classifier'",
                 "prometheus_url 'prometheus:9090'"):
        assert part in message
    with pytest.raises(ManifestError, match="has no tag"):
        render(policy, image="ghcr.io/kfloop/kfloop")
    assert one(render(policy, image=f"{IMAGE}@sha256:" + "0" * 64), "ServingRuntime")["spec"]["containers"][0]["image"].endswith("0" * 64)


def test_every_trigger_filters_on_type_and_no_subscriber_receives_what_it_emits(objects, policy):
    triggers = [o for o in objects if o["kind"] == "Trigger"]
    assert len(triggers) == len(policy.retraining.events) + 1  # payload events no longer pass the Broker; labels do
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    emits = {"classifier-watch": set(policy.retraining.events), "classifier-trigger": set()}
    received = {}
    for trigger in triggers:
        attributes = trigger["spec"]["filter"]["attributes"]
        assert attributes.get("type"), object_id(trigger)
        assert trigger["spec"]["broker"] == one(objects, "Broker")["metadata"]["name"]
        subscriber = trigger["spec"]["subscriber"]
        if "ref" in subscriber:
            name = subscriber["ref"]["name"]
            assert subscriber["ref"]["kind"] == "Service" and services[name]["spec"]["ports"][0]["port"] == 80
        else:  # the watch's dead-letter port: a uri (a Knative reference carries no port)
            name = subscriber["uri"].removeprefix("http://").split(".")[0]
            assert subscriber["uri"] == f"http://{name}.{NAMESPACE}.svc.cluster.local:{DEAD_LETTER_PORT}/"
        received.setdefault(name, set()).add(attributes["type"])
        assert attributes["type"] not in emits[name]
    assert received == {"classifier-trigger": set(policy.retraining.events), "classifier-watch": {LABEL_EVENT}}


def test_with_istio_the_failure_rule_reads_istio_telemetry_and_the_request_rule_stays_on_kfloops_counter(policy):
    def queries(objects):
        return {t["name"]: t["metadata"]["query"] for t in one(objects, "ScaledObject")["spec"]["triggers"]}

    plain, istio = queries(render(policy)), queries(render(policy, istio=True))
    assert "kfloop_requests_total" in plain["predictor-failures"]
    assert istio["predictor-failures"] == (
        'sum(rate(istio_requests_total{reporter="destination",destination_workload="classifier-predictor",'
        f'destination_workload_namespace="{NAMESPACE}",response_code=~"5.."}}[1m])) / '
        'sum(rate(istio_requests_total{reporter="destination",destination_workload="classifier-predictor",'
        f'destination_workload_namespace="{NAMESPACE}"}}[1m]))'
    )
    assert istio["request-rate"] == plain["request-rate"]
    pods = [pod for _, pod, _ in workloads(render(policy, istio=True)) if "labels" in pod]
    assert pods and all(pod["labels"]["sidecar.istio.io/inject"] == "true" for pod in pods)


def test_network_policies_open_only_the_loops_paths(objects):
    policies = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "NetworkPolicy"}
    assert all(p["policyTypes"] == ["Ingress"] for p in policies.values())

    def sources(name):
        return [(json.dumps(rule.get("from"), sort_keys=True), sorted(p["port"] for p in rule["ports"])) for rule in policies[name]["ingress"]]

    monitoring = json.dumps([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}], sort_keys=True)
    broker_filter = json.dumps([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "knative-eventing"}},
                                 "podSelector": {"matchLabels": {"eventing.knative.dev/brokerRole": "filter"}}}], sort_keys=True)
    transformer = json.dumps([{"podSelector": {"matchLabels": {"component": "transformer", "serving.kserve.io/inferenceservice": "classifier"}}}], sort_keys=True)
    assert sources("classifier-transformer-ingress") == [("null", [8080, 9081])]  # clients, and KServe's logging agent
    assert sources("classifier-predictor-ingress") == [(transformer, [8080]), (monitoring, [8080])]
    assert sources("classifier-watch-ingress") == [(transformer, [8080]), (monitoring, [8080]),  # the payload logger
                                                   (broker_filter, [DEAD_LETTER_PORT])]  # the Triggers' dead letters
    assert sources("classifier-trigger-ingress") == [(broker_filter, [8080]), (monitoring, [8080])]  # Trigger deliveries
    # Every pod of the loop is selected by exactly one policy.
    for pod in (p for p in loop_pods(objects) if p.namespace == NAMESPACE):
        selecting = [n for n, p in policies.items() if p["podSelector"]["matchLabels"].items() <= pod.labels.items()]
        assert len(selecting) == 1, (pod.name, selecting)


# A small NetworkPolicy evaluator (networking.k8s.io/v1 ingress semantics), enough for what the loop renders:
# a pod is isolated for ingress once a policy of its namespace selects it, and then admits a connection
# if any rule of any selecting policy matches both the port and the source. A peer with a
# namespaceSelector *and* a podSelector needs both to match; with a podSelector only, the source must
# be in the policy's namespace; a rule without ``from`` admits every source, one without ``ports``
# every port. Anything it does not model (ipBlock, named ports, egress) raises instead of guessing.


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: dict[str, str]


def namespace_labels(namespace: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": namespace}  # set on every namespace by Kubernetes itself (1.22+)


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector: every matchLabels pair and every matchExpressions requirement holds; {} selects all."""
    if not set(selector) <= {"matchLabels", "matchExpressions"}:
        raise NotImplementedError(f"selector fields {sorted(selector)}")
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for requirement in selector.get("matchExpressions", []):
        key, operator, values = requirement["key"], requirement["operator"], requirement.get("values", [])
        holds = {"In": key in labels and labels[key] in values, "NotIn": key not in labels or labels[key] not in values,
                 "Exists": key in labels, "DoesNotExist": key not in labels}
        if operator not in holds:
            raise NotImplementedError(f"operator {operator}")
        if not holds[operator]:
            return False
    return True


def peer_admits(peer: dict[str, Any], policy_namespace: str, source: Pod) -> bool:
    if not set(peer) <= {"podSelector", "namespaceSelector"} or not peer:
        raise NotImplementedError(f"peer fields {sorted(peer)}")
    if "namespaceSelector" in peer:
        namespace_ok = selects(peer["namespaceSelector"], namespace_labels(source.namespace))
    else:
        namespace_ok = source.namespace == policy_namespace
    return namespace_ok and selects(peer.get("podSelector", {}), source.labels)


def port_admits(ports: list[dict[str, Any]] | None, port: int, protocol: str = "TCP") -> bool:
    for entry in ports or [{}]:
        if entry.get("protocol", "TCP") != protocol:
            continue
        if "port" not in entry:
            return True
        if not isinstance(entry["port"], int):
            raise NotImplementedError(f"named port {entry['port']!r}")
        if entry["port"] <= port <= entry.get("endPort", entry["port"]):
            return True
    return False


def admitted(policies: list[dict[str, Any]], source: Pod, target: Pod, port: int) -> bool:
    """Whether ``policies`` let ``source`` open a TCP connection to ``target`` 's ``port`` (ingress side)."""
    selecting = []
    for policy in policies:
        spec = policy["spec"]
        types = spec.get("policyTypes", ["Ingress"])
        if set(types) - {"Ingress"}:
            raise NotImplementedError(f"policyTypes {types}")
        if policy["metadata"]["namespace"] == target.namespace and selects(spec["podSelector"], target.labels):
            selecting.append(policy)
    if not selecting:
        return True  # not isolated
    return any(port_admits(rule.get("ports"), port)
               and (not rule.get("from") or any(peer_admits(peer, policy["metadata"]["namespace"], source) for peer in rule["from"]))
               for policy in selecting for rule in policy["spec"].get("ingress", []))


def loop_pods(objects: list[dict[str, Any]]) -> list[Pod]:
    """The pods the rendered loop runs, with the labels they get, plus Knative's broker pods that talk to it.

    KServe adds ``serving.kserve.io/inferenceservice`` and ``component`` to an
    InferenceService component's pods (FACTS a); the broker-filter and
    broker-ingress labels are those of knative-eventing's MT broker Deployments (FACTS g).
    """
    pods = []
    for where, pod, _ in workloads(objects):
        if where.startswith("ServingRuntime"):
            continue  # a template: its pods are the InferenceService predictor's
        labels = dict(pod["labels"])
        if where.startswith("InferenceService"):
            isvc, component = where.split("/", 1)[1].split(".")
            labels |= {"serving.kserve.io/inferenceservice": isvc, "component": component}
            name = component
        else:
            name = where.rsplit("-", 1)[-1]
        pods.append(Pod(name, NAMESPACE, labels))
    return pods + [
        Pod("broker-filter", "knative-eventing", {"eventing.knative.dev/brokerRole": "filter",
                                                  "app.kubernetes.io/component": "broker-filter"}),
        Pod("broker-ingress", "knative-eventing", {"eventing.knative.dev/brokerRole": "ingress",
                                                   "app.kubernetes.io/component": "broker-ingress"}),
    ]


def outsiders(pods: list[Pod]) -> list[Pod]:
    """Pods that are not the loop's: Prometheus, a stranger beside the loop, copies of the loop's pods elsewhere."""
    copies = [Pod(f"{pod.name}-copy", "elsewhere", pod.labels) for pod in pods]
    return [Pod("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"}),
            Pod("notebook", NAMESPACE, {"app": "notebook"}), *copies]


@pytest.mark.parametrize("istio", [False, True])
def test_the_watchs_payload_port_admits_only_the_transformer_and_its_dead_letter_port_only_broker_filter(policy, istio):
    objects = render(policy, istio=istio)
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    pods = loop_pods(objects)
    assert {pod.name for pod in pods} == {"predictor", "transformer", "watch", "trigger", "broker-filter", "broker-ingress"}
    watch = next(pod for pod in pods if pod.name == "watch")
    ports = {p["name"]: p["containerPort"]
             for p in one(objects, "Deployment", "classifier-watch")["spec"]["template"]["spec"]["containers"][0]["ports"]}
    payload_port, dead_letter_port = ports["http"], ports["dead-letters"]
    assert [pod.name for pod in pods if admitted(policies, pod, watch, payload_port)] == ["transformer"]
    # Beyond the loop: Prometheus (its namespace, for /metrics on the same port), and nobody else;
    # the transformer's labels outside the loop's namespace do not count.
    assert [pod.name for pod in outsiders(pods) if admitted(policies, pod, watch, payload_port)] == ["prometheus"]
    # The dead-letter port: Knative's broker-filter only (not its ingress, not the transformer, not Prometheus),
    # and broker-filter's labels in another namespace do not count.
    assert [pod.name for pod in pods if admitted(policies, pod, watch, dead_letter_port)] == ["broker-filter"]
    assert [pod.name for pod in outsiders(pods) if admitted(policies, pod, watch, dead_letter_port)] == []
    # No other port of the watch is open to anyone.
    assert not any(admitted(policies, pod, watch, port) for pod in pods + outsiders(pods) for port in (80, 8082, 9081))


def test_only_knatives_broker_filter_reaches_the_trigger_service_and_only_the_transformer_the_predictor(objects):
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    pods = {pod.name: pod for pod in loop_pods(objects)}

    def admitted_to(target: str, port: int = 8080) -> list[str]:
        return [name for name, pod in pods.items() if admitted(policies, pod, pods[target], port)]

    assert admitted_to("trigger") == ["broker-filter"]  # not the broker ingress, not the watch: alarms come via Triggers
    assert admitted_to("predictor") == ["transformer"]
    assert sorted(admitted_to("transformer")) == sorted(pods)  # the entry point
    assert sorted(admitted_to("transformer", 9081)) == sorted(pods)  # KServe's agent in front of it
    for target in ("trigger", "predictor"):
        assert [pod.name for pod in outsiders(list(pods.values())) if admitted(policies, pod, pods[target], 8080)] == ["prometheus"]


@pytest.mark.parametrize("peers, source, expected", [
    # namespaceSelector and podSelector in ONE peer: both must match
    ([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ke"}}, "podSelector": {"matchLabels": {"r": "f"}}}],
     Pod("p", "ke", {"r": "f"}), True),
    ([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ke"}}, "podSelector": {"matchLabels": {"r": "f"}}}],
     Pod("p", "ke", {"r": "i"}), False),
    ([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ke"}}, "podSelector": {"matchLabels": {"r": "f"}}}],
     Pod("p", "other", {"r": "f"}), False),
    # ... as TWO peers: either one suffices (the podSelector peer in the policy's own namespace)
    ([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ke"}}}, {"podSelector": {"matchLabels": {"r": "f"}}}],
     Pod("p", "ke", {"r": "i"}), True),
    ([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ke"}}}, {"podSelector": {"matchLabels": {"r": "f"}}}],
     Pod("p", "ns", {"r": "f"}), True),
    ([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ke"}}}, {"podSelector": {"matchLabels": {"r": "f"}}}],
     Pod("p", "other", {"r": "f"}), False),
    # matchLabels is a subset test; {} selects everything; matchExpressions
    ([{"podSelector": {"matchLabels": {"r": "f", "s": "t"}}}], Pod("p", "ns", {"r": "f"}), False),
    ([{"podSelector": {}}], Pod("p", "ns", {}), True),
    ([{"podSelector": {}}], Pod("p", "other", {}), False),
    ([{"namespaceSelector": {}}], Pod("p", "other", {}), True),
    ([{"podSelector": {"matchExpressions": [{"key": "r", "operator": "In", "values": ["f", "g"]}]}}], Pod("p", "ns", {"r": "g"}), True),
    ([{"podSelector": {"matchExpressions": [{"key": "r", "operator": "DoesNotExist"}]}}], Pod("p", "ns", {"r": "g"}), False),
    (None, Pod("p", "other", {}), True),  # no ``from``: everyone
])
def test_the_network_policy_evaluator_follows_the_kubernetes_semantics(peers, source, expected):
    rule: dict[str, Any] = {"ports": [{"protocol": "TCP", "port": 8080}]}
    if peers is not None:
        rule["from"] = peers
    policy = {"metadata": {"namespace": "ns"}, "spec": {"podSelector": {"matchLabels": {"app": "t"}}, "policyTypes": ["Ingress"], "ingress": [rule]}}
    target = Pod("t", "ns", {"app": "t"})
    assert admitted([policy], source, target, 8080) is expected
    assert admitted([policy], source, target, 8081) is False  # a port no rule names
    assert admitted([policy], source, Pod("u", "ns", {"app": "u"}), 9999) is True  # not selected: not isolated
    assert admitted([{**policy, "spec": {**policy["spec"], "ingress": []}}], source, target, 8080) is False  # isolated, no rule
    with pytest.raises(NotImplementedError):
        admitted([{**policy, "spec": {**policy["spec"], "ingress": [{"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}]}}], source, target, 8080)


# --- who may send events (Knative OIDC) -------------------------------------------------------


def test_only_the_watchs_service_account_may_post_the_policys_alarm_types_to_the_broker(objects, policy, shared_specs):
    event_policy, broker = one(objects, "EventPolicy", "classifier-alarms"), one(objects, "Broker")
    validate_manifest(event_policy, shared_specs)
    assert event_policy["apiVersion"] == "eventing.knative.dev/v1alpha1"
    assert event_policy["spec"]["to"] == [{"ref": {"apiVersion": broker["apiVersion"], "kind": "Broker", "name": broker["metadata"]["name"]}}]
    watch_account = one(objects, "Deployment", "classifier-watch")["spec"]["template"]["spec"]["serviceAccountName"]
    assert event_policy["spec"]["from"] == [{"sub": f"system:serviceaccount:{NAMESPACE}:{watch_account}"}]  # no prefix '*'
    assert event_policy["spec"]["filters"] == [{"any": [{"exact": {"type": event}} for event in policy.retraining.events]}]
    assert set(policy.retraining.events) <= set(ALARM_EVENTS) and REQUEST_EVENT not in json.dumps(event_policy)
    # The policy applies once the Broker exists; it comes after it in apply order.
    kinds = [o["kind"] for o in objects]
    assert kinds.index("Broker") < kinds.index("EventPolicy")


def test_labels_enter_the_broker_only_from_the_labellers_account_and_reach_the_watchs_oidc_port(objects, shared_specs):
    """The cluster's label door: the labeller's ServiceAccount (and no one else) may post io.kfloop.label events to
    the Broker; a Trigger delivers them to the watch's dead-letter port with a token of its own ServiceAccount,
    which the watch admits there -- and the trigger service does not."""
    event_policy, trigger = one(objects, "EventPolicy", "classifier-labels"), one(objects, "Trigger", LABELS_TRIGGER)
    for obj in (event_policy, trigger):
        validate_manifest(obj, shared_specs)
    labeller = one(objects, "ServiceAccount", "classifier-labeller")
    assert labeller["automountServiceAccountToken"] is False  # its token is made for the Broker's audience, by its client
    assert event_policy["spec"]["from"] == [{"sub": f"system:serviceaccount:{NAMESPACE}:classifier-labeller"}]
    assert event_policy["spec"]["filters"] == [{"exact": {"type": LABEL_EVENT}}]
    assert event_policy["spec"]["to"] == one(objects, "EventPolicy", "classifier-alarms")["spec"]["to"]
    assert trigger["spec"]["filter"] == {"attributes": {"type": LABEL_EVENT}} and "delivery" not in trigger["spec"]
    assert trigger["spec"]["subscriber"] == {"uri": f"http://classifier-watch.{NAMESPACE}.svc.cluster.local:{DEAD_LETTER_PORT}/",
                                             "audience": f"classifier-watch.{NAMESPACE}"}
    watch_args = one(objects, "Deployment", "classifier-watch")["spec"]["template"]["spec"]["containers"][0]["args"]
    trigger_args = one(objects, "Deployment", "classifier-trigger")["spec"]["template"]["spec"]["containers"][0]["args"]
    label_subject = trigger_subject(NAMESPACE, LABELS_TRIGGER)
    assert label_subject in watch_args and label_subject not in trigger_args
    names = [object_id(o) for o in objects]
    assert names.index("Deployment/classifier-watch") < names.index(f"Trigger/{LABELS_TRIGGER}")


def test_the_watch_posts_alarms_with_a_projected_token_for_the_brokers_audience(objects):
    template = one(objects, "Deployment", "classifier-watch")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in template["volumes"]}
    (container,) = template["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "broker-token"]
    assert volumes["broker-token"] == {"name": "broker-token", "projected": {"sources": [{"serviceAccountToken": {
        "audience": f"eventing.knative.dev/broker/{NAMESPACE}/default", "expirationSeconds": 3600, "path": "token"}}]}}
    assert broker_audience("KFloop", "Default") == "eventing.knative.dev/broker/kfloop/default"  # as Knative publishes it
    assert mount == {"name": "broker-token", "mountPath": "/var/run/secrets/kfloop/broker", "readOnly": True}
    args = container["args"]
    assert f"{mount['mountPath']}/token" == BROKER_TOKEN_PATH == args[args.index("--sink-token-file") + 1]
    assert args[args.index("--sink") + 1] == broker_ingress_url(NAMESPACE, "default")
    assert args[args.index("--event-auth") + 1] == "none"  # the NetworkPolicy admits only the transformer's pods
    # Its API token (it reads the OIDC discovery that checks dead letters' tokens) is bound to no Role:
    # only what every ServiceAccount may do.
    account = template["serviceAccountName"]
    assert not [o for o in objects if o["kind"] in ("RoleBinding", "ClusterRoleBinding")
                and any(subject["name"] == account for subject in o["subjects"])]


def test_the_trigger_service_checks_the_audience_and_the_subject_of_each_trigger(objects):
    triggers = alarm_triggers(objects)
    audiences = {t["spec"]["subscriber"]["audience"] for t in triggers}
    assert audiences == {f"classifier-trigger.{NAMESPACE}"}
    args = one(objects, "Deployment", "classifier-trigger")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--alarm-auth") + 1] == "oidc"
    assert args[args.index("--oidc-audience") + 1] in audiences
    subjects = [args[i + 1] for i, arg in enumerate(args) if arg == "--oidc-subject"]
    # Knative names each Trigger's ServiceAccount kmeta.ChildName(<trigger>, "-oidc-eventing.knative.dev-Trigger"):
    # these Trigger names are longer than 29 characters, so the names are truncated and hashed.
    assert subjects == [f"system:serviceaccount:{NAMESPACE}:" + knative_child_name(t["metadata"]["name"], "-oidc-eventing.knative.dev-Trigger").lower()
                        for t in triggers]
    assert subjects == [f"system:serviceaccount:{NAMESPACE}:classifier-trigger-on-drift-det5ad38360105a63786aecb70a40784125",
                        f"system:serviceaccount:{NAMESPACE}:classifier-trigger-on-outlier-d" + hashlib.md5(
                            b"classifier-trigger-on-outlier-detected-oidc-eventing.knative.dev-Trigger").hexdigest(),
                        f"system:serviceaccount:{NAMESPACE}:classifier-trigger-on-accuracy-" + hashlib.md5(
                            b"classifier-trigger-on-accuracy-low-oidc-eventing.knative.dev-Trigger").hexdigest()]
    assert trigger_subject("ns", "short") == "system:serviceaccount:ns:short-oidc-eventing.knative.dev-trigger"
    # Its ServiceAccount mounts its token: it reads the cluster's OIDC discovery (allowed to every
    # ServiceAccount by the default system:service-account-issuer-discovery binding), no extra RBAC.
    assert one(objects, "ServiceAccount", "classifier-trigger")["automountServiceAccountToken"] is True
    assert {o["kind"] for o in objects} & {"ClusterRoleBinding", "ClusterRole"} == set()


def test_every_alarm_trigger_retries_with_the_policys_back_off_and_dead_letters_to_the_watch(objects, policy, shared_specs):
    triggers = alarm_triggers(objects)
    watch_service = one(objects, "Service", "classifier-watch")
    watch_args = one(objects, "Deployment", "classifier-watch")["spec"]["template"]["spec"]["containers"][0]["args"]
    trigger_args = one(objects, "Deployment", "classifier-trigger")["spec"]["template"]["spec"]["containers"][0]["args"]
    dead_letter_port = {p["name"]: p for p in watch_service["spec"]["ports"]}["dead-letters"]
    for trigger in triggers:
        validate_manifest(trigger, shared_specs)
        # The CRD keeps unknown fields under ``delivery`` (for Knative's experimental ones), so its keys are checked here.
        assert trigger["spec"]["delivery"] == {
            "retry": policy.retraining.delivery.retries, "backoffPolicy": "exponential", "backoffDelay": "PT1S",
            "deadLetterSink": {"uri": f"http://classifier-watch.{NAMESPACE}.svc.cluster.local:{dead_letter_port['port']}/",
                               "audience": f"classifier-watch.{NAMESPACE}"},
        }
    # The sink is the watch's dead-letter port, which checks the sink's audience and each Trigger's ServiceAccount
    # (broker-filter forwards a dead letter with the token of the Trigger that could not deliver it).
    assert watch_args[watch_args.index("--dead-letter-port") + 1] == str(DEAD_LETTER_PORT) == str(dead_letter_port["port"])
    assert watch_args[watch_args.index("--dead-letter-auth") + 1] == "oidc"
    assert watch_args[watch_args.index("--oidc-audience") + 1] == triggers[0]["spec"]["delivery"]["deadLetterSink"]["audience"]
    assert watch_args[watch_args.index("--oidc-audience") + 1] != trigger_args[trigger_args.index("--oidc-audience") + 1]
    subjects = [args[i + 1] for args in (watch_args, trigger_args) for i, arg in enumerate(args) if arg == "--oidc-subject"]
    alarm_subjects = [trigger_subject(NAMESPACE, t["metadata"]["name"]) for t in triggers]
    assert subjects == [*alarm_subjects, trigger_subject(NAMESPACE, LABELS_TRIGGER), *alarm_subjects]
    # The Triggers, which name the sink, are applied after the watch that serves it.
    names = [object_id(o) for o in objects]
    assert all(names.index("Deployment/classifier-watch") < names.index(object_id(t)) for t in triggers)


def test_the_policys_delivery_settings_reach_the_triggers(policy):
    slow = policy.model_copy(update={"retraining": policy.retraining.model_copy(update={
        "delivery": policy.retraining.delivery.model_copy(update={"retries": 3, "backoff_delay_seconds": 0.5,
                                                                  "backoff_policy": "linear"})})})
    for trigger in alarm_triggers(render(slow)):
        delivery = trigger["spec"]["delivery"]
        assert (delivery["retry"], delivery["backoffPolicy"], delivery["backoffDelay"]) == (3, "linear", "PT0.5S")


@pytest.mark.parametrize("parent, suffix, want", [  # knative.dev/pkg kmeta/names_test.go
    ("asdf", "-deployment", "asdf-deployment"),
    ("f" * 63, "-deployment", "ffffffffffffffffffff105d7597f637e83cc711605ac3ea4957-deployment"),
    ("f" * 63, "-deploy", "ffffffffffffffffffffffff105d7597f637e83cc711605ac3ea4957-deploy"),
    ("f" * 63, "f" * 63, "fffffffffffffffffffffffffffffff0502661254f13c89973cb3a83e0cbec0"),
    ("a", "f" * 63, "ab5cfd486935decbc0d305799f4ce4414ffffffffffffffffffffffffffffff"),
    ("b" * 32, "f" * 32, "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb329c7c81b9ab3ba71aa139066aa5625d"),
    ("aaaa", "b---a" * 20, "aaaa7a3f7966594e3f0849720eced8212c18b---ab---ab---ab---ab---ab"),
    ("a" * 17, "a.-.-.-.-.-.-.aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "aaaaaaaaaaaaaaaaaa1eb10dc911444f8434af83b7225442da"),
])
def test_knative_child_names_match_knatives_own_test_vectors(parent, suffix, want):
    assert knative_child_name(parent, suffix) == want


def test_the_kfp_token_goes_over_plain_http_only_to_an_in_cluster_service(policy):
    def trigger_args(objects):
        return one(objects, "Deployment", "classifier-trigger")["spec"]["template"]["spec"]["containers"][0]["args"]

    default = trigger_args(render(policy))
    assert default[default.index("--kfp-host") + 1] == "http://ml-pipeline.kubeflow.svc.cluster.local:8888"
    assert "--kfp-allow-http" in default
    assert "--kfp-allow-http" in trigger_args(render(policy, kfp_host="http://ml-pipeline.kubeflow.svc:8888"))
    assert "--kfp-allow-http" not in trigger_args(render(policy, kfp_host="https://kubeflow.example.org/pipeline"))
    with pytest.raises(ManifestError) as caught:
        render(policy, kfp_host="http://kubeflow.example.org/pipeline")
    assert ("kfp_host 'http://kubeflow.example.org/pipeline' would carry the Kubeflow Pipelines token in clear: "
            "use https://, or an in-cluster Service address (NAME.NAMESPACE.svc[.cluster.local])") in str(caught.value)


def test_inference_service_pods_have_disruption_budgets_that_never_block_a_drain(objects):
    budgets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "PodDisruptionBudget"}
    assert set(budgets) == {"classifier-predictor-budget", "classifier-transformer-budget"}  # not the one-replica watch/trigger
    pods = {pod.name: pod for pod in loop_pods(objects)}
    for component in ("predictor", "transformer"):
        budget = budgets[f"classifier-{component}-budget"]
        assert budget["apiVersion"] == "policy/v1"
        assert budget["spec"]["maxUnavailable"] == 1 and "minAvailable" not in budget["spec"]
        assert budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
        assert [name for name, pod in pods.items() if selects(budget["spec"]["selector"], pod.labels)] == [component]


@pytest.mark.parametrize("break_it, validator", [
    (lambda o: one(o, "EventPolicy", "classifier-alarms")["spec"]["from"][0].update(subject="x"), "crd"),
    (lambda o: one(o, "EventPolicy", "classifier-labels")["spec"].update(form=[]), "crd"),
    (lambda o: one(o, "EventPolicy", "classifier-alarms")["spec"]["to"][0]["ref"].update(namespace="x"), "crd"),
    (lambda o: one(o, "Trigger", "classifier-trigger-on-drift-detected")["spec"]["subscriber"].update(audiance="x"), "crd"),
    (lambda o: one(o, "Trigger", "classifier-trigger-on-drift-detected")["spec"]["delivery"]["deadLetterSink"].update(audiance="x"), "crd"),
    (lambda o: one(o, "Trigger", "classifier-trigger-on-outlier-detected")["spec"]["delivery"].update(retry="8"), "crd"),
    (lambda o: one(o, "PodDisruptionBudget", "classifier-predictor-budget")["spec"].update(maxUnavailible=1), "core"),
    (lambda o: one(o, "NetworkPolicy", "classifier-watch-ingress")["spec"]["ingress"][0]["from"][0].update(podSelecter={}), "core"),
    (lambda o: one(o, "Deployment", "classifier-watch")["spec"]["template"]["spec"]["volumes"][-1]["projected"]["sources"][0]["serviceAccountToken"].update(expirySeconds=1), "core"),
])
def test_a_misspelt_field_in_the_new_objects_is_caught(objects, shared_specs, break_it, validator):
    broken = copy.deepcopy(objects)
    break_it(broken)
    changed = [b for a, b in zip(objects, broken) if a != b]
    assert len(changed) == 1
    if validator == "crd":
        with pytest.raises(ManifestError):
            validate_manifest(changed[0], shared_specs)
    else:
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(changed[0], K8S_VERSIONS[0], strict=True)


def test_the_policy_reaches_the_pods_unchanged(objects, policy, tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(one(objects, "ConfigMap")["data"]["policy.yaml"])
    assert load_policy(path) == policy
    deployment = one(objects, "Deployment", "classifier-trigger")["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in deployment["containers"][0]["volumeMounts"]}
    args = deployment["containers"][0]["args"]
    assert args[args.index("--policy") + 1] == f"{mounts['policy']}/policy.yaml"


# --- the kustomize tree ----------------------------------------------------------------------


def run_kfloop(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``kfloop ARGS`` as a user runs it, without the caller's kfloop or kube settings."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("KFLOOP_", "KUBECONFIG"))}
    return subprocess.run([sys.executable, "-m", "kfloop", *args], capture_output=True, text=True, timeout=timeout,
                          env={**clean, "COLUMNS": "200", **(env or {})})


def test_the_checked_in_base_is_exactly_what_kfloop_manifests_renders(tmp_path):
    result = run_kfloop("manifests", *RENDER_ARGS, "-o", str(tmp_path / "base"))
    assert result.returncode == 0, result.stderr
    printed = [Path(line).name for line in result.stdout.split()]
    written = sorted(p.name for p in (tmp_path / "base").iterdir())
    assert sorted(printed) == written == sorted(p.name for p in BASE.iterdir())
    for name in written:
        assert (tmp_path / "base" / name).read_text() == (BASE / name).read_text(), f"manifests/base/{name} is stale: re-render it"
    assert yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"] == printed[:-1]
    assert printed[-1] == "kustomization.yaml"


def kustomize(folder: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (for 'kubectl kustomize') is not installed")
    built = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    return [doc for doc in yaml.safe_load_all(built.stdout) if doc]


@pytest.mark.parametrize("overlay", ["local-kind", "production"])
def test_each_overlay_builds_stays_locked_down_and_keeps_namespace_and_image(overlay, shared_specs):
    built = kustomize(OVERLAYS / overlay)
    assert security_problems(built) == []
    assert {o["metadata"]["namespace"] for o in built} == {NAMESPACE}
    assert {c["image"] for _, _, containers in workloads(built) for c in containers} == {IMAGE}
    for obj in built:
        if obj["kind"] in CRD_KINDS:
            validate_manifest(obj, shared_specs)
        elif obj["kind"] in CORE_KINDS:
            kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)
    if overlay == "production":
        for name in ("classifier-trigger", "classifier-watch"):
            volumes = {v["name"]: v for v in one(built, "Deployment", name)["spec"]["template"]["spec"]["volumes"]}
            assert volumes["state"] == {"name": "state", "persistentVolumeClaim": {"claimName": f"{name}-state"}}
            one(built, "PersistentVolumeClaim", f"{name}-state")


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
    assert len(rows) == len(objects) == 28
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
    assert "28 created, 0 configured, 0 unchanged" in first.stderr
    assert "warning" not in first.stderr
    assert f"InferenceService {NAMESPACE}/classifier is Ready at http://classifier.{NAMESPACE}.example.com" in first.stderr
    second = run_kfloop("deploy", *RENDER_ARGS, "--timeout", "0", env=env)
    assert second.returncode == 0, second.stderr
    assert "0 created, 0 configured, 28 unchanged" in second.stderr


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
