"""Policy compilers: a :class:`~kfloop.policies.Policy` as the Kubernetes objects that carry it out.

Pure functions, no cluster access:

- :func:`compile_scaled_object` -- ``scaling`` as a KEDA ``ScaledObject`` on the
  predictor Deployment KServe's Standard mode creates (full HPA behaviour);
- :func:`compile_kserve_autoscaling` -- ``scaling`` as KServe's own
  ``autoScaling`` fragment, for when KServe should create the ScaledObject;
- :func:`compile_triggers` -- ``retraining.events`` (and the payload feed of the
  drift detector) as Knative Eventing ``Trigger`` objects, with
  ``retraining.delivery`` as the alarm Triggers' retries and dead-letter sink;
- :func:`write_objects` -- one YAML file per object.

The PromQL of every rule comes from :mod:`kfloop.policies.signals`, the single
definition the local engine reads too. The schemas of the results are checked
by :func:`kfloop.manifests.schemas.validate_manifest`; what no schema checks
(replica bounds, object names) is checked here.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from kfloop.errors import PolicyError
from kfloop.kube import dns_label_problem
from kfloop.policies import signals
from kfloop.policies.spec import DeliveryPolicy, Policy, ScalingPolicy
from kfloop.event_types import LABEL_EVENT, REQUEST_EVENT

__all__ = ["compile_kserve_autoscaling", "compile_scaled_object", "compile_triggers", "write_objects"]

KSERVE_ANNOTATIONS = {"serving.kserve.io/autoscalerClass": "keda", "serving.kserve.io/deploymentMode": "Standard"}
EVENT_PREFIX = "io.kfloop."


def compile_scaled_object(
    policy: Policy, *, namespace: str, inference_service: str, prometheus_url: str, auth: str | None = None
) -> dict[str, Any]:
    """The ``keda.sh/v1alpha1`` ScaledObject ``<isvc>-predictor`` scaling that Deployment.

    One ``prometheus`` trigger per scaling rule, named after the rule. Ship it
    with the InferenceService annotated ``serving.kserve.io/autoscalerClass:
    external`` (and ``deploymentMode: Standard``), so KServe creates no HPA or
    ScaledObject of its own for the predictor.

    Missing metrics hold the replicas (``missing_metrics: hold``) because no
    ``fallback`` is set: a trigger whose query fails propagates no metric, and
    the HPA then skips any scale-down while still scaling up on the rules that
    do answer. A ``fallback`` would instead pin the Deployment to a fixed
    ``replicas`` (overriding the other triggers, kedacore/keda#6659), and is
    supported only for ``AverageValue`` triggers anyway. An *empty* answer is
    not missing: it means no matching requests were counted (no 5xx series
    exists before the first failure), so ``ignoreNullValues`` stays ``"true"``
    and reads it as 0.

    ``auth`` names a TriggerAuthentication holding a bearer token for Prometheus.
    Raises :class:`PolicyError` if min_replicas > max_replicas (a CEL rule of the
    CRD that schema validation does not evaluate) or a name is not a DNS-1123 label.
    """
    _check_bounds(policy.scaling)
    _dns_label(namespace, "namespace")
    deployment = _dns_label(f"{_dns_label(inference_service, 'inference service')}-predictor", "predictor Deployment")
    triggers = []
    for rule in policy.scaling.rules:
        trigger: dict[str, Any] = {
            "type": "prometheus",
            "name": rule.name,
            "metricType": signals.signal_of(rule).metric_type,
            "metadata": {
                "serverAddress": prometheus_url,
                "query": signals.promql(rule, policy.model, namespace),
                "threshold": _decimal(rule.threshold),
                "activationThreshold": "0",
                "ignoreNullValues": "true",  # empty = nothing counted = 0; "false" would block scale-down
            },
        }
        if auth is not None:
            trigger["metadata"]["authModes"] = "bearer"
            trigger["authenticationRef"] = {"name": auth, "kind": "TriggerAuthentication"}
        triggers.append(trigger)
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": deployment, "namespace": namespace, "labels": _labels(policy)},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment},
            # KEDA's own loop; between 1 and N replicas the HPA also reads the
            # queries on its sync period (15 s unless the cluster changed it).
            "pollingInterval": policy.scaling.evaluation_seconds,
            "minReplicaCount": policy.scaling.min_replicas,
            "maxReplicaCount": policy.scaling.max_replicas,
            # No "fallback": without one a failing query holds the replicas (see the docstring).
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": {
                "scaleUp": {
                    "stabilizationWindowSeconds": 0,
                    "selectPolicy": "Max",
                    # Up to max_replicas pods per period: any wish is met in one step.
                    "policies": [{"type": "Pods", "value": policy.scaling.max_replicas,
                                  "periodSeconds": policy.scaling.evaluation_seconds}],
                },
                "scaleDown": {"stabilizationWindowSeconds": policy.scaling.cooldown_seconds},
            }}},
            "triggers": triggers,
        },
    }


def compile_kserve_autoscaling(
    policy: Policy, *, prometheus_url: str, namespace: str | None = None
) -> dict[str, Any]:
    """KServe's native KEDA form: ``{"annotations": ..., "predictor": ...}`` to merge into an InferenceService.

    ``predictor`` holds ``minReplicas``, ``maxReplicas`` and ``autoScaling``
    (one External prometheus metric per rule, ``behavior`` stabilization
    windows); ``annotations`` select KEDA and Standard mode. ``namespace``, if
    given, narrows the queries to that namespace as in the ScaledObject.

    KServe's controller (0.20) cannot express all of the policy, so prefer
    :func:`compile_scaled_object` where the difference matters:

    - ``target.type`` is ignored for External metrics and the trigger gets no
      ``metricType``, so KEDA's default ``AverageValue`` applies to every rule:
      a ``failure_rate`` rule wants ``ceil(share / threshold)`` replicas instead
      of one more than the current count;
    - ``activationThreshold`` and ``pollingInterval`` are not passed (KEDA's
      defaults, 0 and 30 s, apply);
    - of the HPA behaviour only the stabilization windows are copied; scale-up
      policies are dropped, so the HPA default rate limit (double, or +4 pods,
      per 15 s) applies.
    """
    _check_bounds(policy.scaling)
    metrics = [
        {
            "type": "External",
            "external": {
                "metric": {
                    "backend": "prometheus",
                    "serverAddress": prometheus_url,
                    "query": signals.promql(rule, policy.model, namespace),
                },
                "target": {"type": signals.signal_of(rule).metric_type, "value": _decimal(rule.threshold)},
            },
        }
        for rule in policy.scaling.rules
    ]
    return {
        "annotations": dict(KSERVE_ANNOTATIONS),
        "predictor": {
            "minReplicas": policy.scaling.min_replicas,
            "maxReplicas": policy.scaling.max_replicas,
            "autoScaling": {
                "metrics": metrics,
                "behavior": {
                    "scaleUp": {"stabilizationWindowSeconds": 0},
                    "scaleDown": {"stabilizationWindowSeconds": policy.scaling.cooldown_seconds},
                },
            },
        },
    }


def compile_triggers(
    policy: Policy,
    *,
    namespace: str,
    broker: str,
    trigger_service: str,
    drift_service: str | None = None,
    trigger_port: int = 80,
    drift_port: int = 80,
    inference_service: str | None = None,
    audience: str | None = None,
    dead_letter_service: str | None = None,
    dead_letter_port: int = 80,
    dead_letter_audience: str | None = None,
) -> list[dict[str, Any]]:
    """Knative ``eventing.knative.dev/v1`` Triggers on ``broker``.

    One per ``retraining.events`` type, delivering that type to the trigger
    service -- with ``audience``, Knative (OIDC on) sends each delivery a token
    for that audience, which the trigger service verifies -- and, only when a
    ``drift_service`` is named, one delivering ``org.kubeflow.serving.inference.request``
    payloads (of ``inference_service`` only, when given) to it. kfloop's own
    manifests name none: KServe's payload logger cannot authenticate to a
    Broker with OIDC on, so it posts to the watch directly (docs/security.md).
    Every Trigger filters on ``type``: an unfiltered Trigger whose subscriber
    replies with an event would loop it back into the Broker.

    Every alarm Trigger carries ``retraining.delivery`` as its ``spec.delivery``
    (retries and back-off) and, when a ``dead_letter_service`` is named, a
    ``deadLetterSink`` on its ``dead_letter_port`` (the watch's dead-letter
    port: it stores what the trigger service did not take in its outbox and
    sends it again); with ``dead_letter_audience`` Knative (OIDC on) sends each
    dead letter a token of the Trigger's own ServiceAccount for that audience.
    Without a sink an alarm that outlasts the retries is dropped.

    A Trigger is named after its subscriber and what it receives, so models
    sharing one trigger service compile the *same* Trigger (applying it again is
    harmless) rather than two that would each deliver every alarm.
    Services are reached as ``ref`` to a ``v1`` Service (port 80) or, on another
    port, by ``uri`` (a Knative reference carries no port).
    """
    for value, what in ((namespace, "namespace"), (broker, "broker"), (trigger_service, "trigger service"),
                        (drift_service or "unset", "drift service"), (dead_letter_service or "unset", "dead-letter service")):
        _dns_label(value, what)
    delivery = _delivery(policy.retraining.delivery)
    if dead_letter_service is not None:
        delivery["deadLetterSink"] = _destination(dead_letter_service, namespace, dead_letter_port, dead_letter_audience)
    triggers = [
        _trigger(f"{trigger_service}-on-{event.removeprefix(EVENT_PREFIX).replace('.', '-')}",
                 policy, namespace, broker, {"type": event},
                 _destination(trigger_service, namespace, trigger_port, audience), delivery=delivery)
        for event in policy.retraining.events
    ]
    if drift_service is None:
        return triggers
    payloads = {"type": REQUEST_EVENT}
    if inference_service is not None:
        payloads["inferenceservicename"] = inference_service
    triggers.append(_trigger(f"{drift_service}-requests", policy, namespace, broker, payloads,
                             _destination(drift_service, namespace, drift_port)))
    return triggers


def compile_label_trigger(policy: Policy, *, namespace: str, broker: str, watch_service: str, port: int,
                          audience: str | None = None) -> dict[str, Any]:
    """The Knative Trigger that delivers ``io.kfloop.label`` events from ``broker`` to the watch's Broker-facing
    (dead-letter) ``port``: a cluster's label door. With ``audience`` (OIDC on) each delivery carries a token of
    the Trigger's own ServiceAccount for it, which the watch checks; who may put labels into the Broker is the
    Broker's EventPolicy's business. No retries beyond Knative's own: a batch refused for an unknown id (404,
    its answer not yet at the watch) is retried, a malformed one is not."""
    _dns_label(watch_service, "watch service")
    return _trigger(f"{watch_service}-labels", policy, namespace, broker, {"type": LABEL_EVENT},
                    _destination(watch_service, namespace, port, audience))


def write_objects(objects: list[dict[str, Any]], directory: str | Path) -> list[Path]:
    """Write each object to ``<directory>/<kind-lower>-<name>.yaml``; returns the paths in order."""
    directory = Path(directory)
    paths = [directory / f"{obj['kind'].lower()}-{obj['metadata']['name']}.yaml" for obj in objects]
    if len(set(paths)) != len(paths):
        raise PolicyError(f"two objects share a kind and a name: {sorted(str(p.name) for p in paths)}")
    directory.mkdir(parents=True, exist_ok=True)
    for obj, path in zip(objects, paths):
        path.write_text(yaml.safe_dump(obj, sort_keys=False, width=1_000_000))
    return paths


def _trigger(name: str, policy: Policy, namespace: str, broker: str, attributes: dict[str, str],
             subscriber: dict[str, Any], delivery: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"broker": broker, "filter": {"attributes": attributes}, "subscriber": subscriber}
    if delivery is not None:
        spec["delivery"] = copy.deepcopy(delivery)  # each Trigger its own: one object's edits must not reach another's
    return {
        "apiVersion": "eventing.knative.dev/v1",
        "kind": "Trigger",
        "metadata": {"name": _dns_label(name, "Trigger name"), "namespace": namespace, "labels": _labels(policy)},
        "spec": spec,
    }


def _delivery(delivery: DeliveryPolicy) -> dict[str, Any]:
    """The policy's retries as a Knative ``DeliverySpec`` (``backoffDelay`` an ISO-8601 duration)."""
    return {"retry": delivery.retries, "backoffPolicy": delivery.backoff_policy, "backoffDelay": delivery.backoff_delay()}


def _destination(service: str, namespace: str, port: int, audience: str | None = None) -> dict[str, Any]:
    """A Knative ``Destination``: a ``ref`` to a ``v1`` Service on port 80, else a ``uri`` (a reference carries no port).

    A plain Service publishes no OIDC audience, so Knative sends a token only when
    the destination names one.
    """
    if port == 80:
        destination: dict[str, Any] = {"ref": {"apiVersion": "v1", "kind": "Service", "name": service}}
    else:
        destination = {"uri": f"http://{service}.{namespace}.svc.cluster.local:{port}/"}
    if audience is not None:
        destination["audience"] = audience
    return destination


def _labels(policy: Policy) -> dict[str, str]:
    return {"app.kubernetes.io/managed-by": "kfloop", "app.kubernetes.io/part-of": policy.model}


def _check_bounds(scaling: ScalingPolicy) -> None:
    if scaling.min_replicas > scaling.max_replicas:
        raise PolicyError(
            f"scaling.min_replicas ({scaling.min_replicas}) must not exceed scaling.max_replicas ({scaling.max_replicas})"
        )


def _dns_label(value: str, what: str) -> str:
    problem = dns_label_problem(value, what)
    if problem is not None:
        raise PolicyError(problem)
    return value


def _decimal(threshold: float) -> str:
    """A threshold as both KEDA (a Go float) and KServe (a Kubernetes quantity) parse it: ``2`` -> ``"2"``."""
    return format(threshold, ".15g")
