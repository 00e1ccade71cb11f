"""The scaling signals: one table (:data:`SIGNALS`) for KEDA, Prometheus, the local engine and the demo.

Every signal is read from kfloop's own counter
``kfloop_requests_total{model, version, component, status_class}`` of the
predictor, so a cluster (KEDA's Prometheus trigger) and one machine (the
embedded engine reading the servers' ``/metrics``) judge the same numbers.
A :class:`Signal` says everything kfloop does with one kind of rule -- its
PromQL, its value from locally measured rates, how the HPA compares it with
the threshold and how many replicas it wants -- so no other module branches
on a signal's name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

from kfloop.policies.spec import ScalingRule

__all__ = ["COMPONENT", "HPA_TOLERANCE", "REQUESTS_METRIC", "SIGNALS", "Signal", "promql", "selector", "signal_of"]

REQUESTS_METRIC = "kfloop_requests_total"
COMPONENT = "predictor"
HPA_TOLERANCE = 0.1  # the HPA leaves the replica count alone within 10 % of its target

MetricType = Literal["AverageValue", "Value"]


def selector(model: str, *, failures_only: bool = False, namespace: str | None = None) -> str:
    """The label selector of ``model``'s predictor requests (only 5xx answers with ``failures_only``)."""
    labels = [f'model="{model}"', f'component="{COMPONENT}"']
    if failures_only:
        labels.append('status_class="5xx"')
    if namespace:
        labels.append(f'namespace="{namespace}"')
    return "{" + ",".join(labels) + "}"


def _rate(selection: str, window: str) -> str:
    return f"sum(rate({REQUESTS_METRIC}{selection}[{window}]))"


def _istio_failure_share(workload_selector: str, window: str) -> str:
    return (f'sum(rate(istio_requests_total{{{workload_selector},response_code=~"5.."}}[{window}]))'
            f" / sum(rate(istio_requests_total{{{workload_selector}}}[{window}]))")


def _average_value_wish(value: float, threshold: float, current: int) -> int:
    # The HPA compares the per-replica average with the target and keeps the count within the tolerance.
    if current > 0 and abs(value / (threshold * current) - 1.0) <= HPA_TOLERANCE:
        return current
    return math.ceil(value / threshold)


def _value_wish(value: float, threshold: float, current: int) -> int:
    ratio = value / threshold
    return current if abs(ratio - 1.0) <= HPA_TOLERANCE else math.ceil(current * ratio)


def _failure_share(total: float | None, failed: float | None) -> float | None:
    return failed / total if total and failed is not None else None


@dataclass(frozen=True)
class Signal:
    """One kind of scaling rule.

    ``query(model, namespace, window)`` is its PromQL; ``istio_query``, where
    set, the same signal from Istio's counters (``workload_selector, window``);
    ``local_value(total_rate, failed_rate)`` its value from the rates the
    embedded source measures; ``wish(value, threshold, current)`` the
    replicas it wants, as the HPA computes it for ``metric_type``;
    ``describe(threshold, window)`` the automation table's wording.
    """

    name: str
    metric_type: MetricType
    query: Callable[[str, str | None, str], str]
    local_value: Callable[[float | None, float | None], float | None]
    wish: Callable[[float, float, int], int]
    describe: Callable[[float, str], str]
    istio_query: Callable[[str, str], str] | None = None


SIGNALS: dict[str, Signal] = {
    # The *total* request rate: the HPA divides it by the replica count (AverageValue).
    "request_rate": Signal(
        name="request_rate",
        metric_type="AverageValue",
        query=lambda model, namespace, window: _rate(selector(model, namespace=namespace), window),
        local_value=lambda total, failed: total,
        wish=_average_value_wish,
        describe=lambda threshold, window: f"request rate over {threshold:g} req/s per replica ({window} window)",
    ),
    # The share of 5xx answers (4xx are the client's): compared as a Value, one more replica above it.
    "failure_rate": Signal(
        name="failure_rate",
        metric_type="Value",
        query=lambda model, namespace, window: (
            f"{_rate(selector(model, failures_only=True, namespace=namespace), window)}"
            f" / {_rate(selector(model, namespace=namespace), window)}"
        ),
        local_value=_failure_share,
        wish=_value_wish,
        describe=lambda threshold, window: f"failure rate of the predictor over {threshold:.0%} ({window} window)",
        istio_query=_istio_failure_share,
    ),
}


def signal_of(rule: ScalingRule) -> Signal:
    """The :class:`Signal` a rule is about."""
    return SIGNALS[rule.signal]


def promql(rule: ScalingRule, model: str, namespace: str | None = None) -> str:
    """The PromQL of ``rule`` for ``model``'s predictor."""
    return signal_of(rule).query(model, namespace, rule.window)
