"""Every workload and RBAC object is locked down, and credentials reach only the pods that need them."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kfloop.manifests.render import (
    KFP_TOKEN_SECRET, STORAGE_READONLY_SECRET, STORAGE_SECRET,
)
from loop_objects import (
    NAMESPACE, one, workloads, security_problems,
)


def test_every_workload_and_rbac_object_is_locked_down(objects):
    assert security_problems(objects) == []
    assert len(list(workloads(objects))) == 6  # predictor (and its ServingRuntime), transformer, explainer, watch, trigger


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
        "InferenceService/classifier.explainer": {STORAGE_READONLY_SECRET},  # the same (it is a transformer)
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
            elif where.endswith(("transformer", "explainer")):
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
