"""Payload CloudEvents of real requests, caught by a real HTTP sink: KServe-shaped, with the caller's trace."""

from __future__ import annotations

import time

import pytest

from testbed import v1

pytestmark = pytest.mark.slow


def test_payload_events_are_kserve_shaped_cloudevents_with_the_trace_and_an_id_per_request(stack):
    """Two requests under one client id become two pairs of events, each pair with its own ce-id and the
    client's id beside it (clientrequestid); request and response of one call share their id."""
    sink = stack["sink"]
    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    rows = stack["holdout"].holdout_features[:2].tolist()
    answers = [v1(stack, {"instances": rows}, headers={"traceparent": trace, "x-request-id": "call-42"}) for _ in range(2)]
    assert [a.status_code for a in answers] == [200, 200]
    deadline = time.time() + 10
    while time.time() < deadline and len([e for e in sink.events if e.get("clientrequestid") == "call-42"]) < 4:
        time.sleep(0.05)
    events = [e for e in sink.events if e.get("clientrequestid") == "call-42"]
    by_id: dict[str, dict] = {}
    for event in events:
        by_id.setdefault(event["id"], {})[event["type"]] = event
    assert len(by_id) == 2 and "call-42" not in by_id
    for pair, answer in zip(by_id.values(), answers):
        request, response = pair["org.kubeflow.serving.inference.request"], pair["org.kubeflow.serving.inference.response"]
        assert request.data == {"instances": rows}
        assert response.data == answer.json()
        for event in (request, response):
            assert event["specversion"] == "1.0" and event["datacontenttype"] == "application/json"
            assert event["inferenceservicename"] == "leaf" and event["component"] == "transformer"
            assert event["traceparent"].split("-")[1] == "0af7651916cd43dd8448eb211c80319c"
            assert event["traceparent"] != trace  # a child span of the caller's
