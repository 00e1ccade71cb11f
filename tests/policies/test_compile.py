"""Policy compilers: the objects match the upstream CRDs (unknown fields included) and say what the policy says."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kfloop.event_types import ACCURACY_EVENT, DRIFT_EVENT, OUTLIER_EVENT
from kfloop.errors import ManifestError, PolicyError
from kfloop.manifests.schemas import validate_manifest
from kfloop.policies import load_policy, signals
from kfloop.policies.compile import compile_kserve_autoscaling, compile_scaled_object, compile_triggers, write_objects

PROMETHEUS = "http://prometheus.monitoring.svc:9090"
TRIGGER_SETTINGS = {"namespace": "ml", "broker": "default", "trigger_service": "kfloop-trigger", "drift_service": "leaf-watch"}


@pytest.fixture(scope="module")
def policy():
    return load_policy()


@pytest.fixture
def scaled_object(policy):
    return compile_scaled_object(policy, namespace="ml", inference_service="leaf", prometheus_url=PROMETHEUS)


def inference_service(policy) -> dict:
    """A minimal v1beta1 InferenceService with the KServe-native autoscaling merged in."""
    native = compile_kserve_autoscaling(policy, prometheus_url=PROMETHEUS, namespace="ml")
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": "leaf", "namespace": "ml", "annotations": native["annotations"]},
        "spec": {"predictor": {
            **native["predictor"],
            "model": {"modelFormat": {"name": "sklearn"}, "storageUri": "s3://models/leaf/v1"},
        }},
    }


def test_the_scaled_object_matches_the_keda_crd_and_targets_the_predictor_deployment(scaled_object, shared_specs):
    validate_manifest(scaled_object, shared_specs)
    spec = scaled_object["spec"]
    assert scaled_object["metadata"] == {
        "name": "leaf-predictor", "namespace": "ml",
        "labels": {"app.kubernetes.io/managed-by": "kfloop", "app.kubernetes.io/part-of": "classifier"},
    }
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "leaf-predictor"}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"], spec["pollingInterval"]) == (1, 4, 15)
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"] == {"stabilizationWindowSeconds": 300}
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 0
    assert behavior["scaleUp"]["policies"] == [{"type": "Pods", "value": 4, "periodSeconds": 15}]
    assert "fallback" not in spec  # a fallback would pin replicas; missing metrics must hold them


def test_each_rule_becomes_a_prometheus_trigger_with_string_metadata(scaled_object, policy):
    triggers = scaled_object["spec"]["triggers"]
    assert [(t["type"], t["name"], t["metricType"]) for t in triggers] == [
        ("prometheus", "request-rate", "AverageValue"), ("prometheus", "predictor-failures", "Value"),
    ]
    assert [t["metadata"]["threshold"] for t in triggers] == ["2", "0.9"]
    for trigger, rule in zip(triggers, policy.scaling.rules):
        assert trigger["metadata"]["query"] == signals.promql(rule, "classifier", "ml")
        assert trigger["metadata"]["serverAddress"] == PROMETHEUS
        assert trigger["metadata"]["activationThreshold"] == "0"
        assert trigger["metadata"]["ignoreNullValues"] == "true"
        assert all(isinstance(value, str) for value in trigger["metadata"].values())
        assert "authenticationRef" not in trigger and "authModes" not in trigger["metadata"]


def test_the_queries_are_exactly_those_of_the_signals_module(scaled_object):
    queries = [t["metadata"]["query"] for t in scaled_object["spec"]["triggers"]]
    selector = 'model="classifier",component="predictor"'
    assert queries == [
        f'sum(rate(kfloop_requests_total{{{selector},namespace="ml"}}[5m]))',
        f'sum(rate(kfloop_requests_total{{{selector},status_class="5xx",namespace="ml"}}[1m]))'
        f' / sum(rate(kfloop_requests_total{{{selector},namespace="ml"}}[1m]))',
    ]


def test_a_trigger_authentication_adds_bearer_auth_to_every_trigger(policy, shared_specs):
    scaled = compile_scaled_object(policy, namespace="ml", inference_service="leaf", prometheus_url=PROMETHEUS, auth="prometheus-token")
    validate_manifest(scaled, shared_specs)
    for trigger in scaled["spec"]["triggers"]:
        assert trigger["authenticationRef"] == {"name": "prometheus-token", "kind": "TriggerAuthentication"}
        assert trigger["metadata"]["authModes"] == "bearer"


def test_min_replicas_above_max_replicas_is_rejected_by_both_scaling_compilers(policy):
    inverted = policy.model_copy(update={"scaling": policy.scaling.model_copy(update={"min_replicas": 5, "max_replicas": 2})})
    message = "scaling.min_replicas (5) must not exceed scaling.max_replicas (2)"
    with pytest.raises(PolicyError, match=message.replace("(", r"\(").replace(")", r"\)")):
        compile_scaled_object(inverted, namespace="ml", inference_service="leaf", prometheus_url=PROMETHEUS)
    with pytest.raises(PolicyError, match=r"must not exceed"):
        compile_kserve_autoscaling(inverted, prometheus_url=PROMETHEUS)


@pytest.mark.parametrize("namespace, isvc, bad", [
    ("ML", "leaf", "namespace 'ML'"),
    ("ml", "leaf_v2", "inference service 'leaf_v2'"),
    ("ml", "x" * 60, "predictor Deployment 'xxx"),
])
def test_names_that_are_not_dns_labels_are_rejected(policy, namespace, isvc, bad):
    with pytest.raises(PolicyError, match=f"^{bad}.* is not a DNS-1123 label"):
        compile_scaled_object(policy, namespace=namespace, inference_service=isvc, prometheus_url=PROMETHEUS)


def test_an_inference_service_with_the_native_autoscaling_matches_the_kserve_crd(policy, shared_specs):
    isvc = inference_service(policy)
    validate_manifest(isvc, shared_specs)
    predictor = isvc["spec"]["predictor"]
    assert isvc["metadata"]["annotations"] == {
        "serving.kserve.io/autoscalerClass": "keda", "serving.kserve.io/deploymentMode": "Standard",
    }
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (1, 4)
    assert predictor["autoScaling"]["behavior"]["scaleDown"] == {"stabilizationWindowSeconds": 300}
    externals = [metric["external"] for metric in predictor["autoScaling"]["metrics"]]
    assert [metric["type"] for metric in predictor["autoScaling"]["metrics"]] == ["External", "External"]
    assert [e["metric"]["query"] for e in externals] == [signals.promql(r, "classifier", "ml") for r in policy.scaling.rules]
    assert [e["target"] for e in externals] == [{"type": "AverageValue", "value": "2"}, {"type": "Value", "value": "0.9"}]
    assert {e["metric"]["backend"] for e in externals} == {"prometheus"}


def test_a_misspelt_field_is_reported_with_its_path(policy, shared_specs):
    isvc = inference_service(policy)
    isvc["spec"]["predictor"]["autoScalling"] = isvc["spec"]["predictor"].pop("autoScaling")
    with pytest.raises(ManifestError) as caught:
        validate_manifest(isvc, shared_specs)
    assert str(caught.value) == (
        "InferenceService/leaf does not match its CRD: "
        "$.spec.predictor: Additional properties are not allowed ('autoScalling' was unexpected)"
    )


def test_an_integer_threshold_and_a_bad_enum_are_both_reported(scaled_object, policy, shared_specs):
    broken = copy.deepcopy(scaled_object)
    broken["spec"]["triggers"][0]["metadata"]["threshold"] = 2
    broken["spec"]["triggers"][1]["authenticationRef"] = {"name": "token", "kind": "Secret"}
    with pytest.raises(ManifestError) as caught:
        validate_manifest(broken, shared_specs)
    message = str(caught.value)
    assert "$.spec.triggers[0].metadata.threshold: 2 is not of type 'string'" in message
    assert "$.spec.triggers[1].authenticationRef.kind: 'Secret' is not one of ['TriggerAuthentication', 'ClusterTriggerAuthentication']" in message

    isvc = inference_service(policy)
    isvc["spec"]["predictor"]["autoScaling"]["metrics"][0]["external"]["metric"]["backend"] = "influxdb"
    with pytest.raises(ManifestError, match=r"\$\.spec\.predictor\.autoScaling\.metrics\[0\]\.external\.metric\.backend: 'influxdb' is not one of \['prometheus', 'graphite'\]"):
        validate_manifest(isvc, shared_specs)


def test_int_or_string_fields_take_both_but_not_a_malformed_quantity(policy, shared_specs):
    isvc = inference_service(policy)
    target = isvc["spec"]["predictor"]["autoScaling"]["metrics"][0]["external"]["target"]
    target["value"] = 2
    validate_manifest(isvc, shared_specs)
    target["value"] = "two"
    with pytest.raises(ManifestError, match=r"metrics\[0\]\.external\.target\.value: 'two' does not match"):
        validate_manifest(isvc, shared_specs)


WIDGET_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.example.com}
spec:
  group: example.com
  names: {kind: Widget, plural: widgets}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size: {type: string, x-kubernetes-int-or-string: true, anyOf: [{type: integer}, {type: string}]}
              limit: {x-kubernetes-int-or-string: true, anyOf: [{type: integer}, {type: string}], nullable: true}
              note: {type: string, nullable: true}
              mode: {type: string, enum: [fast, slow], nullable: true}
              extra: {type: object, x-kubernetes-preserve-unknown-fields: true, properties: {known: {type: string}}}
"""


def test_the_recipe_relaxes_int_or_string_and_nullable_and_forbids_unknown_fields_below_the_root(tmp_path):
    (tmp_path / "example").mkdir()
    (tmp_path / "example" / "widgets.yaml").write_text(WIDGET_CRD)
    widget = {
        "apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"},
        "spec": {"size": 3, "limit": None, "note": None, "mode": None, "extra": {"known": "k", "anything": 1}},
    }
    validate_manifest(widget, tmp_path)
    widget["spec"].update(sise=3, mode="medium")
    with pytest.raises(ManifestError) as caught:
        validate_manifest(widget, tmp_path)
    assert str(caught.value) == (
        "Widget/w does not match its CRD: $.spec: Additional properties are not allowed ('sise' was unexpected); "
        "$.spec.mode: 'medium' is not one of ['fast', 'slow', None]"
    )


def test_a_kind_without_a_crd_is_an_error(shared_specs):
    with pytest.raises(ManifestError, match="no CustomResourceDefinition for Service in group ''"):
        validate_manifest({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}}, shared_specs)
    with pytest.raises(ManifestError, match=r"the CRD defines versions \['v1alpha1'\], not 'v2'"):
        validate_manifest({"apiVersion": "keda.sh/v2", "kind": "ScaledObject"}, shared_specs)


def test_triggers_match_the_knative_crd_and_every_one_filters_on_type(policy, shared_specs):
    triggers = compile_triggers(policy, **TRIGGER_SETTINGS)
    for trigger in triggers:
        validate_manifest(trigger, shared_specs)
        assert trigger["spec"]["broker"] == "default"
        assert trigger["spec"]["filter"]["attributes"]["type"]
    assert [(t["metadata"]["name"], t["spec"]["filter"]["attributes"], t["spec"]["subscriber"]) for t in triggers] == [
        ("kfloop-trigger-on-drift-detected", {"type": DRIFT_EVENT},
         {"ref": {"apiVersion": "v1", "kind": "Service", "name": "kfloop-trigger"}}),
        ("kfloop-trigger-on-outlier-detected", {"type": OUTLIER_EVENT},
         {"ref": {"apiVersion": "v1", "kind": "Service", "name": "kfloop-trigger"}}),
        ("kfloop-trigger-on-accuracy-low", {"type": ACCURACY_EVENT},
         {"ref": {"apiVersion": "v1", "kind": "Service", "name": "kfloop-trigger"}}),
        ("leaf-watch-requests", {"type": "org.kubeflow.serving.inference.request"},
         {"ref": {"apiVersion": "v1", "kind": "Service", "name": "leaf-watch"}}),
    ]


def test_only_the_policys_retraining_events_get_a_trigger(policy):
    drift_only = policy.model_copy(update={"retraining": policy.retraining.model_copy(update={"events": [DRIFT_EVENT]})})
    types = [t["spec"]["filter"]["attributes"]["type"] for t in compile_triggers(drift_only, **TRIGGER_SETTINGS)]
    assert types == [DRIFT_EVENT, "org.kubeflow.serving.inference.request"]


def test_the_drift_trigger_can_be_narrowed_to_one_inference_service_and_another_port(policy):
    drift = compile_triggers(policy, **TRIGGER_SETTINGS, drift_port=8085, inference_service="leaf")[-1]
    assert drift["spec"]["filter"]["attributes"] == {
        "type": "org.kubeflow.serving.inference.request", "inferenceservicename": "leaf",
    }
    assert drift["spec"]["subscriber"] == {"uri": "http://leaf-watch.ml.svc.cluster.local:8085/"}


def test_a_trigger_name_longer_than_a_dns_label_is_rejected(policy):
    with pytest.raises(PolicyError, match=r"^Trigger name 'a{55}-on-drift-detected' is not a DNS-1123 label"):
        compile_triggers(policy, **{**TRIGGER_SETTINGS, "trigger_service": "a" * 55})


def test_alarm_triggers_retry_with_the_policys_back_off_and_dead_letter_to_the_named_sink(policy, shared_specs):
    triggers = compile_triggers(policy, **TRIGGER_SETTINGS, audience="kfloop-trigger.ml", dead_letter_service="leaf-watch",
                                dead_letter_port=8081, dead_letter_audience="leaf-watch.ml")
    *alarms, payloads = triggers
    for trigger in alarms:
        validate_manifest(trigger, shared_specs)
        assert trigger["spec"]["delivery"] == {
            "retry": 8, "backoffPolicy": "exponential", "backoffDelay": "PT1S",
            "deadLetterSink": {"uri": "http://leaf-watch.ml.svc.cluster.local:8081/", "audience": "leaf-watch.ml"},
        }
    assert alarms[0]["spec"]["delivery"] is not alarms[1]["spec"]["delivery"]  # one object's edits stay its own
    assert "delivery" not in payloads["spec"]  # payloads are not dead-lettered into the watch that receives them


def test_a_sink_on_port_80_is_a_service_reference_and_without_a_sink_only_the_retries_are_set(policy, shared_specs):
    (drift, *_) = compile_triggers(policy, **{**TRIGGER_SETTINGS, "drift_service": None}, dead_letter_service="leaf-watch",
                                  dead_letter_audience="leaf-watch.ml")
    assert drift["spec"]["delivery"]["deadLetterSink"] == {"ref": {"apiVersion": "v1", "kind": "Service", "name": "leaf-watch"},
                                                           "audience": "leaf-watch.ml"}
    (drift, *_) = compile_triggers(policy, **{**TRIGGER_SETTINGS, "drift_service": None})
    validate_manifest(drift, shared_specs)
    assert drift["spec"]["delivery"] == {"retry": 8, "backoffPolicy": "exponential", "backoffDelay": "PT1S"}


def test_linear_back_off_and_a_fractional_delay_compile_to_an_iso_8601_duration(tmp_path, shared_specs):
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump({"retraining": {"delivery": {"retries": 4, "backoff_delay_seconds": 2.5,
                                                                "backoff_policy": "linear"}}}))
    (drift, *_) = compile_triggers(load_policy(path), **{**TRIGGER_SETTINGS, "drift_service": None})
    validate_manifest(drift, shared_specs)
    assert drift["spec"]["delivery"] == {"retry": 4, "backoffPolicy": "linear", "backoffDelay": "PT2.5S"}


def test_a_misspelt_dead_letter_sink_field_is_caught_by_the_crd(policy, shared_specs):
    (drift, *_) = compile_triggers(policy, **{**TRIGGER_SETTINGS, "drift_service": None}, dead_letter_service="leaf-watch",
                                  dead_letter_port=8081)
    drift["spec"]["delivery"]["deadLetterSink"]["audiance"] = "leaf-watch.ml"
    drift["spec"]["delivery"]["retry"] = "8"
    with pytest.raises(ManifestError) as caught:
        validate_manifest(drift, shared_specs)
    message = str(caught.value)
    assert "$.spec.delivery.deadLetterSink: Additional properties are not allowed ('audiance' was unexpected)" in message
    assert "$.spec.delivery.retry: '8' is not of type 'integer'" in message


def test_a_dead_letter_service_that_is_not_a_dns_label_is_rejected(policy):
    with pytest.raises(PolicyError, match=r"^dead-letter service 'Leaf_Watch' is not a DNS-1123 label"):
        compile_triggers(policy, **TRIGGER_SETTINGS, dead_letter_service="Leaf_Watch")


def test_objects_are_written_one_file_each_and_read_back_equal(policy, scaled_object, tmp_path):
    objects = [scaled_object, *compile_triggers(policy, **TRIGGER_SETTINGS)]
    paths = write_objects(objects, tmp_path / "out")
    assert [p.name for p in paths] == [
        "scaledobject-leaf-predictor.yaml", "trigger-kfloop-trigger-on-drift-detected.yaml",
        "trigger-kfloop-trigger-on-outlier-detected.yaml", "trigger-kfloop-trigger-on-accuracy-low.yaml",
        "trigger-leaf-watch-requests.yaml",
    ]
    assert [yaml.safe_load(p.read_text()) for p in paths] == objects
    # Long PromQL stays on one line: the file greps and diffs like the query.
    assert signals.promql(policy.scaling.rules[1], "classifier", "ml") in paths[0].read_text()


def test_two_objects_with_the_same_kind_and_name_are_not_written(scaled_object, tmp_path):
    with pytest.raises(PolicyError, match="two objects share a kind and a name"):
        write_objects([scaled_object, scaled_object], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra", [[], ["--drift-service", "leaf-watch", "--audience", "kfloop-trigger.ml",
                                       "--dead-letter-service", "leaf-watch", "--dead-letter-audience", "leaf-watch.ml"]],
                         ids=["alarms only", "with the broker payload route, an audience and a dead-letter sink"])
def test_the_cli_writes_the_scaled_object_and_triggers_and_prints_their_paths(tmp_path, shared_specs, extra):
    out = tmp_path / "manifests"
    completed = subprocess.run(
        [sys.executable, "-m", "kfloop", "policy", "compile", "-o", str(out), "--namespace", "ml",
         "--inference-service", "leaf", "--prometheus-url", PROMETHEUS, *extra],
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    printed = [Path(line) for line in completed.stdout.splitlines()]
    assert sorted(printed) == sorted(out.iterdir())
    assert [p.name for p in printed] == [
        "scaledobject-leaf-predictor.yaml", "trigger-kfloop-trigger-on-drift-detected.yaml",
        "trigger-kfloop-trigger-on-outlier-detected.yaml", "trigger-kfloop-trigger-on-accuracy-low.yaml",
        *(["trigger-leaf-watch-requests.yaml"] if extra else []),
    ]
    for path in printed:
        validate_manifest(yaml.safe_load(path.read_text()), shared_specs)
    alarm = yaml.safe_load(printed[1].read_text())
    assert alarm["spec"]["subscriber"].get("audience") == ("kfloop-trigger.ml" if extra else None)
    assert alarm["spec"]["delivery"].get("deadLetterSink") == (
        {"uri": "http://leaf-watch.ml.svc.cluster.local:8081/", "audience": "leaf-watch.ml"} if extra else None)
    if extra:
        payloads = yaml.safe_load(printed[-1].read_text())
        assert payloads["spec"]["filter"]["attributes"]["inferenceservicename"] == "leaf"
        assert "audience" not in payloads["spec"]["subscriber"]


def test_the_cli_without_a_prometheus_url_says_where_to_give_one(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "kfloop", "policy", "compile", "-o", str(tmp_path / "out"), "--namespace", "ml",
         "--inference-service", "leaf"],
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 1
    assert "error: give --prometheus-url, or set scaling.prometheus_url in the policy" in completed.stderr
    assert not (tmp_path / "out").exists()
