"""Every rendered object validates against its upstream schema (CRDs from ../shared/specs, core kinds with
kubernetes-validate), and the objects agree with each other where a schema cannot say it."""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest

from kfloop.errors import ManifestError
from kfloop.manifests.schemas import validate_manifest
from loop_objects import (
    NAMESPACE, CRD_KINDS, NO_CRD_HERE, CORE_KINDS, K8S_VERSIONS, one, object_id, workloads,
)


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
    assert len(checked) == 19  # + the explainer's NetworkPolicy and PodDisruptionBudget
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
