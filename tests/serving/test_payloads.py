"""Payload CloudEvents of real requests, caught by a real HTTP sink: KServe-shaped, with the caller's trace."""

from __future__ import annotations

import time

import pytest

from testbed import v1

pytestmark = pytest.mark.slow


def test_payload_events_are_kserve_shaped_cloudevents_with_the_trace(stack):
    sink = stack["sink"]
    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    answer = v1(stack, {"instances": stack["holdout"].holdout_features[:2].tolist()}, headers={"traceparent": trace, "ce-id": "call-42"})
    assert answer.status_code == 200
    deadline = time.time() + 10
    while time.time() < deadline and len([e for e in sink.events if e["id"] == "call-42"]) < 2:
        time.sleep(0.05)
    events = {e["type"]: e for e in sink.events if e["id"] == "call-42"}
    request, response = events["org.kubeflow.serving.inference.request"], events["org.kubeflow.serving.inference.response"]
    assert request.data == {"instances": stack["holdout"].holdout_features[:2].tolist()}
    assert response.data == answer.json()
    for event in (request, response):
        assert event["specversion"] == "1.0" and event["datacontenttype"] == "application/json"
        assert event["inferenceservicename"] == "leaf" and event["component"] == "transformer"
        assert event["traceparent"].split("-")[1] == "0af7651916cd43dd8448eb211c80319c"
        assert event["traceparent"] != trace  # a child span of the caller's
