"""The loop's rendered objects as the manifest tests read them: the values ``manifests/base`` was rendered
with, ``render`` and finders, the pod templates, the security walk, a small NetworkPolicy evaluator and
``kfloop`` run as a user runs it. Imported by the test modules of this folder (``from loop_objects import``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from kubernetes_validate import utils as kv_utils

from kfloop.manifests.render import (
    render_objects,
)


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



def render(policy, **overrides: Any) -> list[dict[str, Any]]:
    values = {"namespace": NAMESPACE, "image": IMAGE, "storage_uri": STORAGE_URI, "registry_uri": REGISTRY,
              "prometheus_url": PROMETHEUS, **overrides}
    return render_objects(policy, **values)



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



def run_kfloop(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``kfloop ARGS`` as a user runs it, without the caller's kfloop or kube settings."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("KFLOOP_", "KUBECONFIG"))}
    return subprocess.run([sys.executable, "-m", "kfloop", *args], capture_output=True, text=True, timeout=timeout,
                          env={**clean, "COLUMNS": "200", **(env or {})})


