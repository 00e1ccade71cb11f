"""Payload CloudEvents of real requests, caught by a real HTTP sink: KServe-shaped, with the caller's trace;
and a logger that never stops sending: an event it cannot serialise is counted and skipped, and one the
sink cannot take yet is retried."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from prometheus_client import REGISTRY

from testbed import EventSink, v1
from kfloop.retry import Backoff
from kfloop.event_types import REQUEST_EVENT
from kfloop.local.supervisor import free_port
from kfloop.serving.payloads import EventContext, PayloadLogger

pytestmark = pytest.mark.slow


def test_payload_events_are_kserve_shaped_cloudevents_with_the_trace_and_an_id_per_request(stack):
    """Two requests under one client id become two pairs of events, each pair with its own ce-id and the
    client's id beside it (clientrequestid); request and response of one call share their id, which the answer
    carries as x-request-id; the response names the version that answered (modelversion)."""
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
        # the answer names the id its rows were captured under (what a label names), not the client's
        assert answer.headers["x-request-id"] == request["id"] == response["id"]
        assert response["modelversion"] == "1" and "modelversion" not in request.get_attributes()
        for event in (request, response):
            assert event["specversion"] == "1.0" and event["datacontenttype"] == "application/json"
            assert event["inferenceservicename"] == "leaf" and event["component"] == "transformer"
            assert event["traceparent"].split("-")[1] == "0af7651916cd43dd8448eb211c80319c"
            assert event["traceparent"] != trace  # a child span of the caller's


def test_a_grpc_answer_carries_the_id_its_rows_were_captured_under_as_a_parameter(stack):
    """gRPC has no response headers through KServe's servicer: the capture id travels as the answer's
    ``x-request-id`` parameter, beside the client's own id in the V2 ``id``."""
    from kserve import InferenceGRPCClient, InferInput, InferRequest

    sink = stack["sink"]
    rows = stack["holdout"].holdout_features[:3].astype(np.float32)

    async def ask():
        request = InferRequest(model_name="leaf", request_id="call-grpc-7",
                               infer_inputs=[InferInput("features", list(rows.shape), "FP32")])
        request.inputs[0].set_data_from_numpy(rows)
        client = InferenceGRPCClient(stack["runtime"].endpoints["grpc"])
        try:
            return await client.infer(request)
        finally:
            await client.close()

    answer = asyncio.run(ask())
    captured = answer.parameters["x-request-id"].string_param
    assert answer.id == "call-grpc-7" and captured not in ("", "call-grpc-7")
    deadline = time.time() + 10
    while time.time() < deadline and len([e for e in sink.events if e["id"] == captured]) < 2:
        time.sleep(0.05)
    events = {e["type"]: e for e in sink.events if e["id"] == captured}
    assert set(events) == {REQUEST_EVENT, "org.kubeflow.serving.inference.response"}
    assert events[REQUEST_EVENT]["clientrequestid"] == "call-grpc-7"


def payload_events(model: str, outcome: str) -> float:
    return REGISTRY.get_sample_value("kfloop_payload_events_total", {"model": model, "outcome": outcome}) or 0.0


async def until(check, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not check() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


class Unserialisable:
    def to_json(self) -> bytes:
        raise RuntimeError("this payload cannot be serialised")


def test_an_event_that_cannot_be_serialised_is_counted_and_later_events_are_still_sent():
    sink = EventSink()
    model = "payload-serialisation"

    async def scenario() -> None:
        logger = PayloadLogger(sink.url, EventContext("test", model), model)
        logger.log(REQUEST_EVENT, "broken", Unserialisable(), "application/json", None)
        logger.log(REQUEST_EVENT, "odd", {"not json": object()}, "application/json", None)  # orjson's TypeError
        for number in range(3):
            logger.log(REQUEST_EVENT, f"good-{number}", {"instances": [[number]]}, "application/json", None)
        await until(lambda: payload_events(model, "sent") == 3)  # counted once the sink has answered
        assert not logger._worker.done()  # still there for the next event

    try:
        asyncio.run(scenario())
    finally:
        sink.close()
    assert [e["id"] for e in sink.events] == ["good-0", "good-1", "good-2"]
    assert [e.data for e in sink.events] == [{"instances": [[n]]} for n in range(3)]
    assert (payload_events(model, "error"), payload_events(model, "sent")) == (2, 3)


def test_an_event_the_sink_cannot_take_yet_is_retried_until_it_can():
    port = free_port()
    model = "payload-retry"
    sinks: list[EventSink] = []

    async def scenario() -> None:
        logger = PayloadLogger(f"http://127.0.0.1:{port}/", EventContext("test", model), model, backoff=Backoff((0.1,)))
        logger.log(REQUEST_EVENT, "early", {"instances": [[1.0]]}, "application/json", None)
        await asyncio.sleep(0.5)  # nothing listens yet: the event waits and is tried again
        sinks.append(EventSink(port))
        await until(lambda: payload_events(model, "sent") == 1)

    try:
        asyncio.run(scenario())
    finally:
        for sink in sinks:
            sink.close()
    assert [e["id"] for e in sinks[0].events] == ["early"]
    assert (payload_events(model, "sent"), payload_events(model, "failed")) == (1, 0)
