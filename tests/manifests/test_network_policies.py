"""The NetworkPolicies open only the loop's paths, checked with a small evaluator of Kubernetes' ingress
semantics (loop_objects.py), which is itself tested here."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kfloop.manifests.render import (
    DEAD_LETTER_PORT,
)
from loop_objects import (
    NAMESPACE, render, one, Pod, admitted, loop_pods, outsiders,
)


def test_network_policies_open_only_the_loops_paths(objects):
    policies = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "NetworkPolicy"}
    assert all(p["policyTypes"] == ["Ingress"] for p in policies.values())

    def sources(name):
        return [(json.dumps(rule.get("from"), sort_keys=True), sorted(p["port"] for p in rule["ports"])) for rule in policies[name]["ingress"]]

    monitoring = json.dumps([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}], sort_keys=True)
    broker_filter = json.dumps([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "knative-eventing"}},
                                 "podSelector": {"matchLabels": {"eventing.knative.dev/brokerRole": "filter"}}}], sort_keys=True)
    transformer = json.dumps([{"podSelector": {"matchLabels": {"component": "transformer", "serving.kserve.io/inferenceservice": "classifier"}}}], sort_keys=True)
    chain = json.dumps([{"podSelector": {"matchLabels": {"component": component, "serving.kserve.io/inferenceservice": "classifier"}}}
                        for component in ("transformer", "explainer")], sort_keys=True)
    assert sources("classifier-transformer-ingress") == [("null", [8080, 9081])]  # clients, and KServe's logging agent
    assert sources("classifier-explainer-ingress") == [("null", [8080])]  # clients' :explain (KServe routes it here)
    assert sources("classifier-predictor-ingress") == [(chain, [8080]), (monitoring, [8080])]
    assert sources("classifier-watch-ingress") == [(transformer, [8080]), (monitoring, [8080]),  # the payload logger
                                                   (broker_filter, [DEAD_LETTER_PORT])]  # the Triggers' dead letters
    assert sources("classifier-trigger-ingress") == [(broker_filter, [8080]), (monitoring, [8080])]  # Trigger deliveries
    # Every pod of the loop is selected by exactly one policy.
    for pod in (p for p in loop_pods(objects) if p.namespace == NAMESPACE):
        selecting = [n for n, p in policies.items() if p["podSelector"]["matchLabels"].items() <= pod.labels.items()]
        assert len(selecting) == 1, (pod.name, selecting)



@pytest.mark.parametrize("istio", [False, True])
def test_the_watchs_payload_port_admits_only_the_transformer_and_its_dead_letter_port_only_broker_filter(policy, istio):
    objects = render(policy, istio=istio)
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    pods = loop_pods(objects)
    assert {pod.name for pod in pods} == {"predictor", "transformer", "explainer", "watch", "trigger", "broker-filter",
                                          "broker-ingress"}
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


def test_only_knatives_broker_filter_reaches_the_trigger_service_and_only_the_transformer_and_explainer_the_predictor(objects):
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    pods = {pod.name: pod for pod in loop_pods(objects)}

    def admitted_to(target: str, port: int = 8080) -> list[str]:
        return [name for name, pod in pods.items() if admitted(policies, pod, pods[target], port)]

    assert admitted_to("trigger") == ["broker-filter"]  # not the broker ingress, not the watch: alarms come via Triggers
    assert admitted_to("predictor") == ["transformer", "explainer"]
    assert sorted(admitted_to("transformer")) == sorted(pods)  # the entry point
    assert sorted(admitted_to("transformer", 9081)) == sorted(pods)  # KServe's agent in front of it
    assert sorted(admitted_to("explainer")) == sorted(pods) and admitted_to("explainer", 9081) == []
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
