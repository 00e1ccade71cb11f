"""The scaling signals as Prometheus queries: one definition for KEDA, Prometheus and the local engine.

Every signal is read from kfloop's own counter
``kfloop_requests_total{model, version, component, status_class}`` of the
predictor, so a cluster (KEDA's Prometheus trigger) and one machine (the
embedded engine reading the servers' ``/metrics``) judge the same numbers.
"""

from __future__ import annotations

from kfloop.policies.spec import ScalingRule

REQUESTS_METRIC = "kfloop_requests_total"
COMPONENT = "predictor"


def selector(model: str, *, failures_only: bool = False, namespace: str | None = None) -> str:
    labels = [f'model="{model}"', f'component="{COMPONENT}"']
    if failures_only:
        labels.append('status_class="5xx"')
    if namespace:
        labels.append(f'namespace="{namespace}"')
    return "{" + ",".join(labels) + "}"


def promql(rule: ScalingRule, model: str, namespace: str | None = None) -> str:
    """The PromQL of ``rule`` for ``model``'s predictor.

    ``request_rate`` is the *total* rate: KEDA/HPA divide it by the replica
    count (metric type ``AverageValue``). ``failure_rate`` is the 5xx share.
    """
    window = rule.window
    every = selector(model, namespace=namespace)
    if rule.signal == "request_rate":
        return f"sum(rate({REQUESTS_METRIC}{every}[{window}]))"
    failed = selector(model, failures_only=True, namespace=namespace)
    return f"sum(rate({REQUESTS_METRIC}{failed}[{window}])) / sum(rate({REQUESTS_METRIC}{every}[{window}]))"


def metric_type(rule: ScalingRule) -> str:
    """How the HPA compares the value with the threshold."""
    return "AverageValue" if rule.signal == "request_rate" else "Value"
