"""The CloudEvent app base: a small real EventService behind create_event_app, served by a real uvicorn server
on loopback and called with httpx. Events in binary and structured mode are accepted with the service's
headers, anything else is refused with ``{"error": ...}`` and the error's status, and no reply carries a
CloudEvent; a reply that waits for work done beside the event loop is sent once the work is done."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from typing import Any

import httpx
import pytest
import uvicorn
from cloudevents.conversion import to_binary, to_structured
from cloudevents.http import CloudEvent
from prometheus_client import CONTENT_TYPE_LATEST

from kfloop.errors import (
    ConflictError,
    InputError,
    KfloopError,
    NotFoundError,
    TemporaryError,
    UpstreamError,
    VersionMismatch,
)
from kfloop.credentials import bearer
from kfloop.serving.auth import LocalToken
from kfloop.serving.events import Delivery, IGNORED_HEADER, EventReply, create_event_app

REFUSALS: dict[str, KfloopError] = {
    "test.missing": NotFoundError("model 'leaf' has no version '9'"),
    "test.conflict": ConflictError("a run for event 'e-1' is already running"),
    "test.mismatch": VersionMismatch("this predictor serves version 2", served_version="2"),
    "test.unavailable": TemporaryError("the sink did not answer"),
    "test.upstream": UpstreamError("predictor 127.0.0.1:9 refused the call"),
}


class Recorder:
    """An EventService: keeps accepted events, ignores ``test.ignored``, refuses the types of ``REFUSALS``."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.refusals: list[KfloopError] = []
        self.refused_types: list[str | None] = []  # the type of each refused event, None where it was not read
        self.lifecycle: list[str] = []
        self.handling_slow = threading.Event()  # set while a ``test.slow`` event is being handled
        self.release = threading.Event()  # a ``test.slow`` event waits for it
        self.work: Future[None] = Future()  # what the reply to a ``test.waits`` event waits for
        self.waiting = threading.Event()  # set once a ``test.waits`` event was handled

    def handle(self, delivery: Delivery) -> EventReply:
        event, content_type = delivery.event, delivery.content_type
        if event["type"] in REFUSALS:
            raise REFUSALS[event["type"]]
        if event["type"] == "test.ignored":
            return EventReply.ignored("test.ignored events are not recorded")
        if event["type"] == "test.slow":
            self.handling_slow.set()
            self.release.wait(10)
        if event["type"] == "test.waits":
            self.waiting.set()
            return EventReply(202, {"x-test-outcome": "waited"}, wait=self.work)
        self.events.append({"id": event["id"], "data": event.get_data(), "content_type": content_type})
        return EventReply(202, {"x-test-outcome": "recorded"})

    def refused(self, error: KfloopError, event_type: str | None) -> None:
        self.refusals.append(error)
        self.refused_types.append(event_type)

    def status(self) -> dict[str, Any]:
        return {"events": len(self.events), "refused": len(self.refusals)}

    def health(self) -> dict[str, str]:
        return {"status": "ok"}


class Served:
    """A uvicorn server for ``app`` on a free loopback port, in a thread, until ``stop``."""

    def __init__(self, app) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(params=[False, True], ids=["inline", "offload"])
def app(request):
    """A fresh service behind a served app, handling events on the event loop (inline) or beside it (offload)."""
    service = Recorder()
    served = Served(create_event_app("test events", service, offload=request.param, authenticator=None))
    yield service, served
    service.release.set()
    if not service.work.done():
        service.work.set_result(None)
    served.stop()


def event(event_type: str = "test.recorded", event_id: str = "e-1", data: Any = None) -> CloudEvent:
    attributes = {"type": event_type, "source": "tests", "id": event_id, "datacontenttype": "application/json"}
    return CloudEvent(attributes, {"rows": [[1.0, 2.0]]} if data is None else data)


def deliver(served: Served, headers_body: tuple[dict[str, str], bytes]) -> httpx.Response:
    headers, body = headers_body
    return httpx.post(served.url, headers=headers, content=body, timeout=10)


def no_cloudevent(answer: httpx.Response) -> bool:
    return not [name for name in answer.headers if name.lower().startswith("ce-")]


@pytest.mark.parametrize("mode", [to_binary, to_structured], ids=["binary", "structured"])
def test_an_event_in_either_mode_is_handed_to_the_service_and_accepted_with_its_headers(app, mode):
    service, served = app
    answer = deliver(served, mode(event(event_id="e-7")))
    assert (answer.status_code, answer.content) == (202, b"")
    assert answer.headers["x-test-outcome"] == "recorded"
    assert no_cloudevent(answer)
    assert [(e["id"], e["data"], e["content_type"]) for e in service.events] == [
        ("e-7", {"rows": [[1.0, 2.0]]}, "application/json"),
    ]
    assert service.refusals == []


def test_an_ignored_event_is_answered_204_with_the_reason(app):
    service, served = app
    answer = deliver(served, to_binary(event("test.ignored")))
    assert (answer.status_code, answer.content) == (204, b"")
    assert answer.headers[IGNORED_HEADER] == "test.ignored events are not recorded"
    assert no_cloudevent(answer)
    assert (service.events, service.refusals) == ([], [])


@pytest.mark.parametrize(("headers", "body"), [
    ({"content-type": "text/plain"}, b"hello"),
    ({"content-type": "application/json"}, b'{"hello": "world"}'),
    ({"ce-specversion": "1.0", "ce-type": "test.recorded", "ce-source": "tests", "content-type": "application/json"}, b"{}"),
], ids=["plain-text", "json-not-an-event", "binary-without-id"])
def test_a_delivery_that_is_not_a_cloudevent_is_refused_400_and_counted(app, headers, body):
    service, served = app
    answer = httpx.post(served.url, headers=headers, content=body, timeout=10)
    assert answer.status_code == 400
    assert answer.headers["content-type"] == "application/json"
    message = answer.json()["error"]
    assert message.startswith("not a CloudEvent: ")
    assert answer.json() == {"error": message}
    assert no_cloudevent(answer)
    assert [(type(e), str(e)) for e in service.refusals] == [(InputError, message)] and service.refused_types == [None]
    assert service.events == []


@pytest.mark.parametrize(("event_type", "status", "headers"), [
    ("test.missing", 404, {}),
    ("test.conflict", 409, {}),
    ("test.mismatch", 409, {"x-kfloop-model-version": "2"}),
    ("test.unavailable", 503, {}),
    ("test.upstream", 502, {}),
])
def test_an_error_the_service_raises_is_answered_with_its_status_and_message(app, event_type, status, headers):
    service, served = app
    answer = deliver(served, to_binary(event(event_type)))
    error = REFUSALS[event_type]
    assert answer.status_code == status
    assert answer.json() == {"error": str(error)}
    assert {name: answer.headers[name] for name in headers} == headers
    assert ("x-kfloop-model-version" in answer.headers) == bool(headers)
    assert no_cloudevent(answer)
    assert service.refusals == [error] and service.refused_types == [event_type]


def test_status_healthz_and_metrics_answer_for_the_service(app):
    service, served = app
    deliver(served, to_binary(event()))
    httpx.post(served.url, content=b"nope", headers={"content-type": "text/plain"})
    assert httpx.get(served.url + "status").json() == {"events": 1, "refused": 1}
    assert httpx.get(served.url + "healthz").json() == {"status": "ok"}
    metrics = httpx.get(served.url + "metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"] == CONTENT_TYPE_LATEST
    assert "# TYPE python_info gauge" in metrics.text


def test_an_offloaded_slow_event_does_not_block_healthz():
    service = Recorder()
    served = Served(create_event_app("test events", service, offload=True, authenticator=None))
    answers: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: answers.append(deliver(served, to_binary(event("test.slow")))))
    sender.start()
    try:
        assert service.handling_slow.wait(10)
        assert httpx.get(served.url + "healthz", timeout=2).json() == {"status": "ok"}
        assert service.events == []  # the slow event is still being handled
    finally:
        service.release.set()
        sender.join(10)
        served.stop()
    assert answers[0].status_code == 202
    assert [e["id"] for e in service.events] == ["e-1"]


def test_a_reply_that_waits_for_work_is_sent_once_it_is_done_and_the_loop_serves_meanwhile(app):
    service, served = app
    answers: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: answers.append(deliver(served, to_binary(event("test.waits")))))
    sender.start()
    try:
        assert service.waiting.wait(10)
        time.sleep(0.3)
        assert answers == []  # the work is not done: no answer yet
        assert httpx.get(served.url + "healthz", timeout=2).json() == {"status": "ok"}  # the event loop is free
        service.work.set_result(None)
        sender.join(10)
    finally:
        if not service.work.done():
            service.work.set_result(None)
    assert (answers[0].status_code, answers[0].headers["x-test-outcome"], answers[0].content) == (202, "waited", b"")


def test_when_the_work_a_reply_waits_for_raises_that_error_is_the_answer(app):
    service, served = app
    error = TemporaryError("alarm a-1 could not be stored in the outbox")
    service.work.set_exception(error)
    answer = deliver(served, to_binary(event("test.waits")))
    assert answer.status_code == 503 and answer.json() == {"error": str(error)}
    assert no_cloudevent(answer)
    assert service.refusals == [error] and service.refused_types == ["test.waits"]


def test_the_startup_and_shutdown_hooks_run_with_the_server():
    service = Recorder()

    async def started() -> None:
        service.lifecycle.append("startup")

    async def stopped() -> None:
        service.lifecycle.append("shutdown")

    served = Served(create_event_app("test events", service, on_startup=started, on_shutdown=stopped, authenticator=None))
    try:
        assert httpx.get(served.url + "healthz").status_code == 200
        assert service.lifecycle == ["startup"]
    finally:
        served.stop()
    assert service.lifecycle == ["startup", "shutdown"]


def test_a_body_over_the_limit_is_refused_413_before_the_service_sees_it():
    service = Recorder()
    served = Served(create_event_app("test events", service, max_body_bytes=1000, authenticator=None))
    try:
        headers, body = to_binary(event(data={"rows": [[0.0] * 400]}))
        answer = deliver(served, (headers, body))
        assert answer.status_code == 413 and "over the limit of 1000 bytes" in answer.json()["error"]
        assert service.events == [] and [type(e).__name__ for e in service.refusals] == ["PayloadTooLarge"]
        assert deliver(served, to_binary(event())).status_code == 202
    finally:
        served.stop()


def test_with_an_authenticator_only_events_with_the_token_reach_the_service_and_refusals_come_before_the_body():
    service = Recorder()
    served = Served(create_event_app("test events", service, max_body_bytes=1000, authenticator=LocalToken("s3cret")))
    try:
        headers, body = to_binary(event())
        missing = httpx.post(served.url, headers=headers, content=body)
        assert missing.status_code == 401 and no_cloudevent(missing)
        assert missing.headers["www-authenticate"] == 'Bearer realm="kfloop"'
        assert httpx.post(served.url, headers=headers | {"authorization": "Bearer s3cre"}, content=body).status_code == 403
        # An over-size body without credentials is answered 401, not 413: nobody learns the limit without the token.
        big = httpx.post(served.url, headers=headers, content=b"x" * 5000)
        assert big.status_code == 401
        assert service.events == [] and [type(e).__name__ for e in service.refusals] == ["Unauthenticated", "Forbidden", "Unauthenticated"]
        assert httpx.post(served.url, headers=headers | bearer("s3cret"), content=body).status_code == 202
        assert [e["id"] for e in service.events] == ["e-1"]
        assert httpx.get(served.url + "healthz").status_code == 200  # health stays open
    finally:
        served.stop()
