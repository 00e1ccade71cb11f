"""The scaling signals table: one entry for each signal a ScalingRule may name, each wishing for replicas as
the Kubernetes HPA does for its metric type, with its local value and its wording."""

from __future__ import annotations

import math
from typing import get_args

import pytest

from kfloop.policies import ScalingRule
from kfloop.policies.signals import HPA_TOLERANCE, SIGNALS, signal_of


def hpa_average_value(total: float, target: float, current: int) -> int:
    """The HPA for an External metric with an AverageValue target (replica_calculator.go,
    GetExternalPerPodMetricReplicas): the ratio of the total to ``target * current`` within the tolerance
    keeps ``current``; otherwise ``ceil(total / target)``."""
    ratio = total / (target * current)
    return current if abs(1.0 - ratio) <= HPA_TOLERANCE else math.ceil(total / target)


def hpa_value(value: float, target: float, current: int) -> int:
    """The HPA for an External metric with a Value target (GetExternalMetricReplicas): the ratio
    ``value / target`` within the tolerance keeps ``current``; otherwise ``ceil(ratio * current)``."""
    ratio = value / target
    return current if abs(1.0 - ratio) <= HPA_TOLERANCE else math.ceil(ratio * current)


def test_the_table_has_exactly_the_signals_a_rule_may_name():
    allowed = set(get_args(ScalingRule.model_fields["signal"].annotation))
    assert allowed == {"request_rate", "failure_rate"}
    assert set(SIGNALS) == allowed
    assert all(signal.name == name for name, signal in SIGNALS.items())


@pytest.mark.parametrize("name", sorted(SIGNALS))
def test_a_rule_is_about_the_signal_it_names(name):
    assert signal_of(ScalingRule(name="r", signal=name, window="1m", threshold=1.0)) is SIGNALS[name]


def test_the_request_rate_is_an_average_value_and_the_failure_rate_a_value():
    assert {name: signal.metric_type for name, signal in SIGNALS.items()} == {
        "request_rate": "AverageValue", "failure_rate": "Value",
    }


@pytest.mark.parametrize(("value", "threshold", "current", "desired"), [
    (7.0, 2.0, 1, 4),  # 3.5 replicas' worth of requests
    (30.0, 2.0, 2, 15),  # the wish is not clamped: max_replicas is the engine's job
    (1.0, 2.0, 4, 1),  # scale in to what the total needs
    (0.0, 2.0, 3, 0),
    (8.2, 2.0, 4, 4),  # 8.2 / (2 * 4) = 1.025: within the tolerance, the HPA keeps 4
    (7.7, 2.0, 4, 4),  # 0.9625: within the tolerance
    (9.0, 2.0, 4, 5),  # 1.125: outside
])
def test_the_request_rate_wishes_as_the_hpa_does_for_an_average_value(value, threshold, current, desired):
    assert hpa_average_value(value, threshold, current) == desired
    assert SIGNALS["request_rate"].wish(value, threshold, current) == desired


@pytest.mark.parametrize(("value", "threshold", "current", "desired"), [
    (0.95, 0.9, 1, 1),  # 1.056: within the tolerance
    (0.85, 0.9, 3, 3),  # 0.944: within the tolerance
    (1.0, 0.9, 1, 2),
    (1.0, 0.9, 3, 4),  # ceil(3 * 1.11)
    (0.45, 0.9, 4, 2),  # half the target: half the replicas
    (0.0, 0.9, 3, 0),
])
def test_the_failure_rate_wishes_as_the_hpa_does_for_a_value(value, threshold, current, desired):
    assert hpa_value(value, threshold, current) == desired
    assert SIGNALS["failure_rate"].wish(value, threshold, current) == desired


@pytest.mark.parametrize(("name", "total", "failed", "value"), [
    ("request_rate", 3.5, 1.0, 3.5),
    ("request_rate", None, None, None),
    ("failure_rate", 10.0, 2.5, 0.25),
    ("failure_rate", 10.0, 0.0, 0.0),
    ("failure_rate", 0.0, 0.0, None),  # no requests: no failure share, not 0 %
    ("failure_rate", None, None, None),
    ("failure_rate", 10.0, None, None),
])
def test_the_local_value_comes_from_the_measured_rates(name, total, failed, value):
    assert SIGNALS[name].local_value(total, failed) == value


def test_each_signal_describes_its_rule_for_the_automation_table():
    assert SIGNALS["request_rate"].describe(2.0, "10s") == "request rate over 2 req/s per replica (10s window)"
    assert SIGNALS["failure_rate"].describe(0.9, "1m") == "failure rate of the predictor over 90% (1m window)"
