"""The watch service driven over HTTP with real CloudEvents: accepted, ignored and malformed events, drift
alarms at a real sink (through an outage and a restart), captured rows, and the production version followed
(the watch's app in this process where no process boundary is tested, a real ``kfloop watch`` elsewhere);
and what it takes being durable first: a full disk (a real small tmpfs) answers 503 and the retry is processed,
an alarm the outbox cannot store holds events back, shards that cannot be written keep their rows, and rows
taken before a crash are written after it; the event that completes a window is answered only once its alarm
is in the outbox, and a window completed just before a crash is tested after it; and the dead-letter port: an
alarm a Knative Trigger could not deliver comes back (with the home's token, or a Trigger's JWT) and reaches the
sink again with the same id."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from cloudevents.conversion import to_binary, to_structured
from cloudevents.http import CloudEvent

from testbed import fill, small_disk, wait_until_answering, EventSink, register_version
from kfloop.event_types import ACCURACY_EVENT, ATTRIBUTION_EVENT, DRIFT_EVENT
from kfloop.credentials import bearer, local_token, token_path
from kfloop.data import load_dataset
from kfloop.registry import ModelRegistry
from kfloop.local.supervisor import free_port
from kfloop.policies.spec import ExplainPolicy
from kfloop.serving.auth import LocalToken
from kfloop.serving.listeners import ServerThread, listening
from kfloop.serving.watch import WatchConfig, WatchService
from kfloop.serving.watch_app import create_app
from kfloop.training import Prepared


REQUEST = "org.kubeflow.serving.inference.request"
RESPONSE = "org.kubeflow.serving.inference.response"


WINDOW = 40


class Watch:
    """A real ``kfloop watch`` process."""

    def __init__(self, registry: Path, sink_port: int, state: Path, port: int | None = None, *, max_batch: int = 1024,
                 extra: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        home = state.parent / "home"
        self.auth = bearer(local_token(home))  # what the transformer sends on one machine
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kfloop", "watch", "--registry", str(registry), "--model", "leaf", "--home", str(home),
             "--sink", f"http://127.0.0.1:{sink_port}/", "--http-port", str(self.port), "--window", str(WINDOW),
             "--stride", "10", "--stride-seconds", "0", "--max-batch", str(max_batch), "--state-dir", str(state),
             "--capture-rows", "50", "--follow-seconds", "0.5", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until_answering(self.url + "healthz", "watch", 60)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)

    def crash(self) -> None:
        self.process.kill()  # SIGKILL: no shutdown work at all
        self.process.wait(30)

    def status(self) -> dict:
        return httpx.get(self.url + "status").json()

    def metric(self, name: str) -> float:
        for line in httpx.get(self.url + "metrics").text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


class InProcessWatch(Watch):
    """The same service and app as ``kfloop watch`` with the same options, served in this process on a real
    loopback port. The process's metrics outlive one watch: counters count from this watch's start."""

    def __init__(self, registry: Path, sink_port: int, state: Path, *, attribution_rows: int = 0) -> None:
        home = state.parent / "home"
        token = local_token(home)
        self.auth = bearer(token)
        config = WatchConfig(registry_uri=str(registry), model="leaf", sink_url=f"http://127.0.0.1:{sink_port}/",
                             state_dir=state, window=WINDOW, stride=10, stride_seconds=0, capture_flush_rows=50,
                             follow_seconds=0.5, sink_token_file=token_path(home),
                             explain=ExplainPolicy(drift_rows=attribution_rows))
        self.server = ServerThread(create_app(WatchService(config), LocalToken(token)),
                                   listening("127.0.0.1", 0, "the watch"), name="in-process-watch", lifespan="on")
        self.server.start()
        self.url = self.server.url + "/"
        self._before: dict[str, float] = {}
        self._before = {name: self.metric(name) for name in self._counters()}

    def _counters(self) -> list[str]:
        """Every counter series, in the order /metrics lists them."""
        lines = httpx.get(self.url + "metrics").text.splitlines()
        return [line.rsplit(" ", 1)[0] for line in lines if line.startswith("kfloop_") and "_total" in line.split(" ")[0]]

    def metric(self, name: str) -> float:
        return super().metric(name) - self._before.get(name, self._before.get(self._series(name), 0.0))

    def _series(self, name: str) -> str:
        """The full series a bare metric name matched (its first labelled line)."""
        return next((series for series in self._before if series == name or series.startswith(name + "{")), name)

    def stop(self) -> None:
        self.server.stop(30)

    def crash(self) -> None:
        raise AssertionError("an in-process watch cannot crash: use Watch (a real process)")


def event(rows: np.ndarray, *, mode: str = "binary", protocol: str = "v1", event_type: str = REQUEST, event_id: str | None = None,
          data: object = None):
    if data is not None:
        pass
    elif protocol == "v1":
        data = {"instances": rows.tolist()}
    else:
        data = {"inputs": [{"name": "features", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}]}
    attributes = {"type": event_type, "source": "test", "id": event_id or str(uuid.uuid4()), "datacontenttype": "application/json"}
    return (to_binary if mode == "binary" else to_structured)(CloudEvent(attributes, data))


def post(watch: Watch, headers_body) -> httpx.Response:
    headers, body = headers_body
    return httpx.post(watch.url, headers=headers | watch.auth, content=body)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, serving_data):
    root = tmp_path_factory.mktemp("watch")
    registry = root / "registry"
    register_version(registry, "leaf", serving_data, n_estimators=20, work=root / "v1")
    register_version(registry, "leaf", serving_data, n_estimators=20, work=root / "v2", promote=False)
    rows = Prepared.load(str(root / "v1" / "prepared.npz")).holdout_features
    return {"root": root, "registry": registry, "rows": rows}


@pytest.fixture
def watch(setup, tmp_path):
    sink = EventSink()
    service = InProcessWatch(setup["registry"], sink.server.server_port, tmp_path / "state")
    yield service, sink
    service.stop()
    sink.close()


def test_events_in_both_modes_and_protocols_are_accepted_with_no_cloudevent_in_the_reply(watch, setup):
    service, _ = watch
    rows = setup["rows"][:5]
    for mode in ("binary", "structured"):
        for protocol in ("v1", "v2"):
            answer = post(service, event(rows, mode=mode, protocol=protocol))
            assert answer.status_code == 202 and answer.content == b""
            assert not [h for h in answer.headers if h.lower().startswith("ce-")]
    assert service.metric("kfloop_watch_rows_scored_total") == 20


def test_malformed_ignored_and_duplicate_events(watch, setup):
    service, _ = watch
    rows = setup["rows"][:3]
    not_an_event = httpx.post(service.url, content=b"hello", headers={"content-type": "text/plain"} | service.auth)
    assert not_an_event.status_code == 400 and "not a CloudEvent" in not_an_event.json()["error"]
    headers, body = event(rows)
    no_id = httpx.post(service.url, headers={k: v for k, v in headers.items() if k != "ce-id"} | service.auth, content=body)
    assert no_id.status_code == 400 and no_id.json()["error"].startswith("not a CloudEvent")
    short = post(service, event(rows[:, :10]))
    assert short.status_code == 400 and "instance 0 has 10 values" in short.json()["error"]
    garbage = httpx.post(service.url, headers=headers | {"ce-id": "g"} | service.auth, content=b"{nope")
    assert garbage.status_code == 400
    response = post(service, event(rows, event_type=RESPONSE))  # a request's body where an answer belongs
    assert response.status_code == 400 and "V1 \"predictions\" or V2 \"outputs\"" in response.json()["error"]
    no_label = post(service, event(rows, event_type=RESPONSE, data={"outputs": [{"name": "probabilities", "data": [0.5]}]}))
    assert no_label.status_code == 204 and no_label.headers["x-kfloop-ignored"] == 'the answer carries no "label" output'
    other = post(service, event(rows, event_type=DRIFT_EVENT))
    assert other.status_code == 204 and "is not watched" in other.headers["x-kfloop-ignored"]
    assert post(service, event(rows, event_id="same")).status_code == 202
    assert post(service, event(rows, event_id="same")).status_code == 202
    assert service.metric('kfloop_watch_events_total{model="leaf",outcome="duplicate"}') == 1
    assert service.metric('kfloop_watch_events_total{model="leaf",outcome="invalid"}') == 5
    assert service.status()["rows_in_window"] == 3


def test_drifted_rows_raise_a_drift_alarm_at_the_sink(watch, setup):
    service, sink = watch
    rows = setup["rows"]
    for start in range(0, WINDOW, 10):
        assert post(service, event(rows[start:start + 10])).status_code == 202
    for _ in range(4):
        post(service, event(rows[:10] * 1.5 + 0.01))
    deadline = time.time() + 15
    while time.time() < deadline and not sink.events:
        time.sleep(0.1)
    alarm = sink.events[0]
    assert alarm["type"] == DRIFT_EVENT and alarm["source"] == "kfloop/watch/leaf"
    data = alarm.data
    assert data["model"] == "leaf" and data["version"] == "1" and data["drift"] is True
    assert data["drifted_features"] > 0 and data["min_p_value"] < data["drift_threshold"]
    assert data["first_drifted_row"] == data["window"]["first_row"]
    assert service.status()["last_alarm"]["id"] == alarm["id"]
    assert service.metric('kfloop_watch_alarms_total{kind="drift",model="leaf"}') == 1


def test_attribution_drift_names_the_features_that_moved_and_clean_rows_raise_none(setup, tmp_path):
    sink = EventSink()
    service = InProcessWatch(setup["registry"], sink.server.server_port, tmp_path / "state", attribution_rows=WINDOW)
    rows = setup["rows"]
    try:
        for start in range(0, 2 * WINDOW, 10):  # clean holdout rows: tested windows, no alarm
            assert post(service, event(rows[start % len(rows):][:10])).status_code == 202
        assert service.metric('kfloop_watch_attribution_ndcg{model="leaf",version="1"}') > 0 and not sink.events
        shifted = rows[:WINDOW] * 1.5 + 0.01
        for start in range(0, WINDOW, 10):
            post(service, event(shifted[start:start + 10]))
        alarm = eventually(lambda: [e for e in sink.events if e["type"] == ATTRIBUTION_EVENT], what="an attribution alarm")[0]
        data = alarm.data
        assert data["version"] == "1" and data["ndcg"] < data["threshold"] <= 0.9 and data["rows"] == WINDOW
        assert len(data["moved"]) == 5 and all(set(m) == {"feature", "baseline_share", "window_share"} for m in data["moved"])
        assert service.status()["last_alarm"]["type"] in (ATTRIBUTION_EVENT, DRIFT_EVENT)
    finally:
        service.stop()
        sink.close()


def test_alarms_survive_a_sink_outage_and_a_restart_and_arrive_once_each(setup, tmp_path):
    sink_port = free_port()
    service = Watch(setup["registry"], sink_port, tmp_path / "state")
    try:
        for _ in range(12):  # 3 windows of shifted rows -> 3 alarms, sink down
            post(service, event(setup["rows"][:10] * 2.0))
        # The last window is tested off the request path: its alarm reaches the outbox a moment later.
        eventually(lambda: service.metric('kfloop_outbox_size{outbox="alarms"}') == 3, what="3 alarms in the outbox")
    finally:
        service.stop()
    assert len(list((tmp_path / "state" / "outbox").glob("*.json"))) == 3
    sink = EventSink(sink_port)
    service = Watch(setup["registry"], sink_port, tmp_path / "state")
    try:
        deadline = time.time() + 30
        while time.time() < deadline and len({e["id"] for e in sink.events}) < 3:
            time.sleep(0.1)
        ids = [e["id"] for e in sink.events]
        assert len(set(ids)) == 3
        assert service.metric('kfloop_outbox_size{outbox="alarms"}') == 0
    finally:
        service.stop()
        sink.close()


def captured(registry: Path) -> list:
    """Every captured shard's rows, oldest first."""
    area = ModelRegistry(registry).captures("leaf")
    return [area.read(shard) for shard in area.captured_shards()]


def test_captured_rows_become_training_data_once_labelled(watch, setup):
    service, _ = watch
    registry = ModelRegistry(setup["registry"])
    area = registry.captures("leaf")
    rows = setup["rows"][:50]
    post(service, event(rows, event_id="cap"))  # 50 rows: a shard is due, and written off the request path
    deadline = time.time() + 10
    while time.time() < deadline and not any(c.ids[0] == "cap:0" for c in captured(setup["registry"])):
        time.sleep(0.1)
    shard = next(c for c in captured(setup["registry"]) if c.ids[0] == "cap:0")
    assert shard.ids == tuple(f"cap:{i}" for i in range(50)) and set(shard.versions) == {"1"}
    assert list(shard.feature_names) == registry.metadata("leaf", "1")["feature_names"]
    np.testing.assert_array_equal(shard.features, rows)  # exactly as received
    labelled = area.add_labelled(shard.labelled(["x"] * 50))
    assert labelled in area.labelled_shards()
    data = load_dataset(str(labelled), target="label")
    np.testing.assert_array_equal(data.features, rows)
    assert data.ids.tolist() == list(shard.ids)


def test_the_watch_follows_the_production_version(watch, setup):
    service, _ = watch
    registry = ModelRegistry(setup["registry"])
    registry.set_production("leaf", "2")
    try:
        deadline = time.time() + 15
        while time.time() < deadline and service.status()["version"] != "2":
            time.sleep(0.2)
        assert service.status()["version"] == "2"
    finally:
        registry.set_production("leaf", "1")


def wait_for_alarm(sink: EventSink, seconds: float = 15) -> list:
    deadline = time.time() + seconds
    while time.time() < deadline and not sink.events:
        time.sleep(0.1)
    return sink.events


def test_a_reused_client_id_does_not_hide_a_shift(watch, setup):
    """KServe's logger names events by the request id; a client that reuses one id sends distinct requests."""
    service, sink = watch
    rows = setup["rows"]
    for start in range(0, WINDOW, 10):
        assert post(service, event(rows[start:start + 10], event_id="client-7")).status_code == 202
    for row in rows[:WINDOW] * 1.5 + 0.01:
        assert post(service, event(row[None, :], event_id="client-7")).status_code == 202
    assert service.metric("kfloop_watch_rows_scored_total") == 2 * WINDOW
    assert service.metric('kfloop_watch_events_total{model="leaf",outcome="duplicate"}') == 0
    alarms = wait_for_alarm(sink)
    assert alarms and alarms[0].data["drift"] is True


def test_a_redelivered_event_is_counted_once_also_across_a_restart(setup, tmp_path):
    sink = EventSink()
    rows = setup["rows"][:3]
    delivery = event(rows, event_id="once")
    service = Watch(setup["registry"], sink.server.server_port, tmp_path / "state")
    try:
        assert post(service, delivery).status_code == 202
        assert post(service, delivery).status_code == 202
        assert service.metric('kfloop_watch_events_total{model="leaf",outcome="duplicate"}') == 1
    finally:
        service.stop()
    service = Watch(setup["registry"], sink.server.server_port, tmp_path / "state")
    try:
        assert post(service, delivery).status_code == 202
        assert service.metric('kfloop_watch_events_total{model="leaf",outcome="duplicate"}') == 1
        assert service.metric("kfloop_watch_rows_scored_total") == 0
        assert post(service, event(rows * 1.01, event_id="once")).status_code == 202  # same id, another request
        assert service.metric("kfloop_watch_rows_scored_total") == 3
    finally:
        service.stop()
        sink.close()
    ids = [row_id for shard in captured(setup["registry"]) for row_id in shard.ids if row_id.startswith("once")]
    assert len(ids) == len(set(ids)) == 6  # the second request's rows got ids of their own


def features(n: int, rows: int) -> dict:
    return {"name": "features", "datatype": "FP32", "shape": [rows, n], "data": [0.0] * (rows * n)}


def test_malformed_payloads_get_400_and_the_watch_keeps_serving(setup, tmp_path):
    sink = EventSink()
    service = Watch(setup["registry"], sink.server.server_port, tmp_path / "state", max_batch=64)
    n = setup["rows"].shape[1]
    bodies = {
        "a string for a tensor": {"inputs": ["x"]},
        "a number for a shape": {"inputs": [{"name": "features", "datatype": "FP32", "shape": 5, "data": [0.0] * 5}]},
        "a float in a shape": {"inputs": [{"name": "features", "datatype": "FP32", "shape": [2.0, n], "data": [0.0] * (2 * n)}]},
        "-1 rows, none sent": {"inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, n], "data": []}]},
        "-1 rows, some sent": {"inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, n], "data": [0.0] * (3 * n)}]},
        "no rows": {"inputs": [features(n, 0)]},
        "over the batch limit": {"inputs": [features(n, 65)]},
        "V1 over the batch limit": {"instances": [[0.0] * n] * 65},
        "a value float32 cannot hold": {"instances": [[1e39] + [0.0] * (n - 1)]},
        "inputs not a list": {"inputs": {"name": "features"}},
        "data not a list": {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, n], "data": "zeros"}]},
        "a list, not an object": [[0.0] * n],
    }
    try:
        for what, body in bodies.items():
            answer = post(service, event(None, data=body))
            assert answer.status_code == 400, (what, answer.status_code, answer.text)
            assert answer.json()["error"], what
        assert post(service, event(setup["rows"][:2], protocol="v2")).status_code == 202
        assert httpx.get(service.url + "healthz").status_code == 200
        assert service.metric("kfloop_watch_rows_scored_total") == 2
        assert service.metric('kfloop_watch_events_total{model="leaf",outcome="invalid"}') == len(bodies)
    finally:
        service.stop()
        sink.close()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=12,
)
near_v2 = st.fixed_dictionaries({"inputs": st.lists(st.fixed_dictionaries({
    "name": st.sampled_from(["features", "margin1"]) | json_values,
    "datatype": st.sampled_from(["FP32", "FP64", "BYTES", "INT64"]) | json_values,
    "shape": st.lists(st.integers(-2, 300) | st.floats(-2, 300) | json_values, max_size=3) | json_values,
    "data": st.lists(st.floats() | st.integers(-10**40, 10**40) | json_values, max_size=20) | json_values,
}), max_size=3) | json_values})
near_v1 = st.fixed_dictionaries({"instances": st.lists(st.lists(st.floats() | json_values, max_size=5) | json_values, max_size=4) | json_values})


def test_no_payload_makes_the_watch_answer_5xx(watch):
    service, _ = watch

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=near_v2 | near_v1 | json_values)
    def probe(body: object) -> None:
        attributes = {"type": REQUEST, "source": "fuzz", "id": str(uuid.uuid4()), "datacontenttype": "application/json"}
        headers, content = to_binary(CloudEvent(attributes, body))
        answer = httpx.post(service.url, headers=headers | service.auth, content=content)
        assert answer.status_code in (202, 400), (body, answer.status_code, answer.text)

    probe()
    assert httpx.get(service.url + "healthz").status_code == 200


# --- an event is taken only once its effect is durable ---------------------------------------------------


def eventually(check, seconds: float = 15, what: str = "condition"):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} not met within {seconds:.0f} s")


def captured_ids(registry: Path, prefix: str) -> list[str]:
    return [row_id for shard in captured(registry) for row_id in shard.ids if row_id.startswith(prefix)]


def test_a_full_disk_answers_503_and_the_retry_is_processed_with_its_rows_and_its_alarm(setup, tmp_path):
    sink = EventSink()
    rows = setup["rows"]
    tag = f"full-{uuid.uuid4().hex[:6]}"
    with small_disk(tmp_path / "disk") as disk:
        service = Watch(setup["registry"], sink.server.server_port, disk / "state")
        try:
            for start in range(0, WINDOW, 10):
                assert post(service, event(rows[start:start + 10], event_id=f"{tag}-clean-{start}")).status_code == 202
            shifted = [event(rows[start:start + 10] * 1.5 + 0.01, event_id=f"{tag}-shift-{start}") for start in range(0, WINDOW, 10)]
            filler = fill(disk)
            for delivery in shifted:
                answer = post(service, delivery)
                assert answer.status_code == 503, answer.text
                assert "cannot be journaled" in answer.json()["error"] and "try again later" in answer.json()["error"]
            assert service.metric('kfloop_watch_events_total{model="leaf",outcome="refused"}') == len(shifted)
            assert service.metric("kfloop_watch_rows_scored_total") == WINDOW  # nothing of them was taken
            filler.unlink()
            for delivery in shifted:  # the sender's retries
                assert post(service, delivery).status_code == 202
            assert service.metric('kfloop_watch_events_total{model="leaf",outcome="duplicate"}') == 0
            assert service.metric("kfloop_watch_rows_scored_total") == 2 * WINDOW
            alarm = eventually(lambda: sink.events, what="an alarm at the sink")[0]
            assert alarm["type"] == DRIFT_EVENT and alarm.data["window"]["last_row"] > WINDOW  # the retried rows'
        finally:
            service.stop()
            sink.close()
    ids = captured_ids(setup["registry"], f"{tag}-shift-")
    assert len(ids) == len(set(ids)) == WINDOW  # each retried event's rows once


def test_an_alarm_the_outbox_cannot_store_holds_events_back_until_it_is_stored(setup, tmp_path):
    sink = EventSink()
    rows = setup["rows"]
    with small_disk(tmp_path / "disk") as disk:
        service = Watch(setup["registry"], sink.server.server_port, disk / "state", extra=("--no-capture",))
        try:
            for start in range(0, WINDOW, 10):
                assert post(service, event(rows[start:start + 10])).status_code == 202
            filler = fill(disk)
            shifted = [event(rows[start:start + 10] * 1.5 + 0.01) for start in range(0, WINDOW, 10)]
            answers = [post(service, delivery) for delivery in shifted]
            # The event whose window raised the alarm waits for it and gets 503: its rows are kept (not captured,
            # in the window), so its retry is a duplicate, taken once the alarm is stored. Every event after it
            # is refused, and nothing of it is kept.
            raised = next(i for i, answer in enumerate(answers) if answer.status_code != 202)
            message = answers[raised].json()["error"]
            assert answers[raised].status_code == 503 and "could not be stored in the outbox" in message
            assert "No space left on device" in message and "this event's rows are kept" in message
            assert all(answer.status_code == 503 and "events are refused until it is" in answer.json()["error"]
                       for answer in answers[raised + 1:])
            refused = post(service, event(rows[:1]))
            assert refused.status_code == 503 and "events are refused until it is" in refused.json()["error"]
            assert post(service, shifted[raised]).status_code == 503  # a duplicate too, until the alarm is stored
            assert service.status()["unstored_alarms"] == 1 and not sink.events
            assert service.metric('kfloop_watch_alarms_unstored{model="leaf"}') == 1
            filler.unlink()
            alarm = eventually(lambda: sink.events, what="the alarm at the sink")[0]
            assert alarm["type"] == DRIFT_EVENT and service.status()["last_alarm"]["id"] == alarm["id"]
            eventually(lambda: post(service, shifted[raised]).status_code == 202, 5, "the retry taken")
            assert service.status()["unstored_alarms"] == 0
            assert service.metric('kfloop_watch_events_total{model="leaf",outcome="duplicate"}') == 1  # that retry
            assert post(service, event(rows[:1], event_id="after-the-alarm")).status_code == 202
        finally:
            service.stop()
            sink.close()
    assert len({e["id"] for e in sink.events}) == len(sink.events) == 1


def test_shards_that_cannot_be_written_keep_their_rows_and_a_full_buffer_answers_503(setup, tmp_path):
    registry = tmp_path / "registry"
    shutil.copytree(setup["registry"], registry, ignore=shutil.ignore_patterns("captures"))
    sink = EventSink()
    rows = setup["rows"][:50]
    with small_disk(registry / "leaf" / "captures") as disk:
        service = Watch(registry, sink.server.server_port, tmp_path / "state")
        try:
            filler = fill(disk)
            for number in range(20):  # 50 rows each: a shard is due after every event, and none can be written
                assert post(service, event(rows, event_id=f"kept-{number}")).status_code == 202
            status = eventually(lambda: (s := service.status())["capture"]["last_error"] and s, what="a failed shard")
            assert "No space left on device" in status["capture"]["last_error"]
            assert status["capture"]["buffered_rows"] == 1000
            last = event(rows, event_id="kept-20")
            answer = post(service, last)
            assert answer.status_code == 503 and "1000 rows wait for a shard that cannot be written" in answer.json()["error"]
            filler.unlink()
            eventually(lambda: service.status()["capture"]["buffered_rows"] == 0, 20, "the buffered rows written")
            assert post(service, last).status_code == 202
        finally:
            service.stop()
            sink.close()
        ids = captured_ids(registry, "kept-")
        assert len(ids) == len(set(ids)) == 21 * 50


def test_rows_taken_before_a_crash_are_written_after_the_restart_and_a_redelivery_stays_a_duplicate(setup, tmp_path):
    sink = EventSink()
    rows = setup["rows"]
    tag = f"crash-{uuid.uuid4().hex[:6]}"
    deliveries = [event(rows[i * 5:(i + 1) * 5], event_id=f"{tag}-{i}") for i in range(3)]  # 15 rows: no shard due
    service = Watch(setup["registry"], sink.server.server_port, tmp_path / "state")
    try:
        for delivery in deliveries:
            assert post(service, delivery).status_code == 202
    finally:
        service.crash()
    assert captured_ids(setup["registry"], tag) == []
    service = Watch(setup["registry"], sink.server.server_port, tmp_path / "state")
    try:
        assert post(service, deliveries[1]).status_code == 202  # the sender never heard back, say
        assert service.metric('kfloop_watch_events_total{model="leaf",outcome="duplicate"}') == 1
        assert service.metric("kfloop_watch_rows_scored_total") == 0
    finally:
        service.stop()
        sink.close()
    ids = captured_ids(setup["registry"], tag)
    assert sorted(ids) == sorted(f"{tag}-{i}:{j}" for i in range(3) for j in range(5))


def outbox_alarms(state: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted((state / "outbox").glob("*.json"))]


def test_the_event_that_completes_a_window_is_answered_only_once_its_alarm_is_in_the_outbox(setup, tmp_path):
    state = tmp_path / "state"
    service = Watch(setup["registry"], free_port(), state)  # the sink is down: alarms stay in the outbox
    try:
        for number in range(1, 4):  # each event a whole window of shifted rows: each raises an alarm
            started = time.monotonic()
            answer = post(service, event(setup["rows"][:WINDOW] * 2.0, event_id=f"window-{number}"))
            waited = time.monotonic() - started
            assert answer.status_code == 202
            alarms = outbox_alarms(state)  # right after the answer, before anything else
            assert len(alarms) == number, f"event {number} was answered (after {waited:.3f} s) before its alarm was stored"
            assert alarms[-1]["type"] == DRIFT_EVENT and alarms[-1]["data"]["drift"] is True
            assert alarms[-1]["data"]["window"]["last_row"] == number * WINDOW
        assert post(service, event(setup["rows"][:5])).status_code == 202  # no window due: answered at once
        assert len(outbox_alarms(state)) == 3
    finally:
        service.stop()


def test_a_window_completed_before_a_crash_is_tested_after_the_restart_and_its_alarm_raised(setup, tmp_path):
    sink = EventSink()
    state, rows = tmp_path / "state", setup["rows"]
    held_back = ("--stride-seconds", "3600")  # after the first test the next waits an hour: due, but never tested
    service = Watch(setup["registry"], sink.server.server_port, state, extra=held_back)
    try:
        assert post(service, event(rows[:WINDOW], event_id="clean")).status_code == 202  # tested at once: no drift
        assert service.status()["windows_tested"] == 1 and service.status()["last_window"]["drift"] is False
        shifted = [event(rows[start:start + 10] * 2.0, event_id=f"shifted-{start}") for start in range(0, WINDOW, 10)]
        for delivery in shifted:  # journaled and in the window, and their window is due; not tested yet
            assert post(service, delivery).status_code == 202
        status = service.status()
        assert (status["windows_tested"], status["rows_in_window"], status["last_alarm"]) == (1, WINDOW, None)
        crashed_at = time.time()
    finally:
        service.crash()
    assert outbox_alarms(state) == [] and not sink.events
    service = Watch(setup["registry"], sink.server.server_port, state, extra=held_back)
    try:
        # The window was tested before the watch served: the sender's retry of the last event is a duplicate.
        assert post(service, shifted[-1]).status_code == 202
        assert service.metric('kfloop_watch_events_total{model="leaf",outcome="duplicate"}') == 1
        status = service.status()
        assert status["windows_tested"] == 1  # the shifted window only: the clean one was marked tested
        (alarm,) = eventually(lambda: sink.events, what="the alarm after the restart")
        data = alarm.data
        assert alarm["type"] == DRIFT_EVENT and data["drift"] is True and data["window"]["rows"] == WINDOW
        first_time = datetime.fromisoformat(data["window"]["first_time"]).timestamp()
        assert first_time < crashed_at  # the rows taken before the crash, with their capture times
        assert status["last_alarm"]["id"] == alarm["id"] and status["rows_in_window"] == 0  # afresh after the alarm
    finally:
        service.stop()
        sink.close()
    # Started once more: the alarm's window is marked in the journal, so it is not tested (nor raised) again.
    again = WatchService(WatchConfig(str(setup["registry"]), "leaf", sink_url="http://127.0.0.1:9/", state_dir=state,
                                     window=WINDOW, stride=10))
    try:
        assert (again.status()["windows_tested"], again.status()["rows_in_window"]) == (0, 0)
        assert outbox_alarms(state) == []
    finally:
        again.close()


# --- dead letters: alarms a Knative Trigger could not deliver come back and are sent again ---------------


DRIFT = DRIFT_EVENT


class DeadLetterWatch(Watch):
    """A real ``kfloop watch`` that also takes dead letters, on a port of their own."""

    def __init__(self, registry: Path, sink_port: int, state: Path, *, extra: tuple[str, ...] = ()) -> None:
        self.dead_letter_port = free_port()
        self.dead_letter_url = f"http://127.0.0.1:{self.dead_letter_port}/"
        super().__init__(registry, sink_port, state, extra=("--dead-letter-port", str(self.dead_letter_port), *extra))
        wait_until_answering(self.dead_letter_url + "healthz", "the watch's dead-letter port", 30)

    def dead_letter(self, headers_body, *, credentials: dict[str, str] | None = None, **extra: str) -> httpx.Response:
        headers, body = headers_body
        return httpx.post(self.dead_letter_url, headers=headers | extra | (self.auth if credentials is None else credentials),
                          content=body, timeout=10)


def alarm(event_id: str, *, model: str = "leaf", event_type: str = DRIFT, mode: str = "binary", data: object = None):
    """An alarm as the watch sent it to the Broker, as Knative's broker-filter dead-letters it: the same event."""
    attributes = {"type": event_type, "source": "kfloop/watch/leaf", "id": event_id, "datacontenttype": "application/json"}
    body = {"model": model, "kind": "drift", "drift": True, "min_p_value": 1e-9} if data is None else data
    return (to_binary if mode == "binary" else to_structured)(CloudEvent(attributes, body))


# What Knative adds to a dead letter: the destination that failed, its status and the start of its body (base64).
UNREACHABLE = {"ce-knativeerrordest": "http://leaf-trigger.ml.svc.cluster.local/", "ce-knativeerrorcode": "500",
               "ce-knativeerrordata": "ZGlhbCB0Y3A6IGNvbm5lY3Rpb24gcmVmdXNlZA=="}  # "dial tcp: connection refused"


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_a_dead_lettered_alarm_is_stored_again_and_reaches_the_sink_with_the_same_id_type_source_and_data(setup, tmp_path, mode):
    sink = EventSink()
    service = DeadLetterWatch(setup["registry"], sink.server.server_port, tmp_path / "state")
    try:
        answer = service.dead_letter(alarm("alarm-1", mode=mode), **UNREACHABLE)
        assert answer.status_code == 202 and answer.content == b""
        (delivered,) = eventually(lambda: sink.events, what="the dead letter at the sink")
        assert (delivered["id"], delivered["type"], delivered["source"]) == ("alarm-1", DRIFT, "kfloop/watch/leaf")
        assert delivered.data == {"model": "leaf", "kind": "drift", "drift": True, "min_p_value": 1e-9}
        assert not [name for name in delivered.get_attributes() if name.startswith("knativeerror")]  # a fresh delivery
        assert service.metric('kfloop_watch_dead_letters_total{model="leaf",outcome="requeued"}') == 1
        # The payload port takes no dead letters, and the dead-letter port no payloads (below): one sender each.
        assert post(service, alarm("alarm-2")).status_code == 204
    finally:
        service.stop()
        sink.close()


def test_a_dead_letter_is_answered_only_once_it_is_durable_and_survives_a_crash(setup, tmp_path):
    sink_port = free_port()  # the Broker is down
    service = DeadLetterWatch(setup["registry"], sink_port, tmp_path / "state")
    try:
        assert service.dead_letter(alarm("kept"), **UNREACHABLE).status_code == 202
    finally:
        service.crash()
    sink = EventSink(sink_port)
    service = DeadLetterWatch(setup["registry"], sink_port, tmp_path / "state")
    try:
        (delivered,) = eventually(lambda: sink.events, what="the dead letter after the crash")
        assert delivered["id"] == "kept"
    finally:
        service.stop()
        sink.close()


def test_dead_letters_need_the_token_and_only_this_models_alarms_are_stored(setup, tmp_path):
    sink = EventSink()
    service = DeadLetterWatch(setup["registry"], sink.server.server_port, tmp_path / "state")
    try:
        no_token = service.dead_letter(alarm("anonymous"), credentials={})
        assert no_token.status_code == 401 and "credentials" in no_token.json()["error"]
        assert service.dead_letter(alarm("forged"), credentials={"authorization": "Bearer nope"}).status_code == 403
        payload = service.dead_letter(event(setup["rows"][:3]))
        assert payload.status_code == 204 and "is not an alarm" in payload.headers["x-kfloop-ignored"]
        other = service.dead_letter(alarm("someone-elses", model="other"))
        assert other.status_code == 204 and "alarm is for model 'other'" in other.headers["x-kfloop-ignored"]
        for data in ({"kind": "drift"}, [1, 2]):  # an alarm must name its model, in a JSON object
            assert service.dead_letter(alarm("unnamed", data=data)).status_code == 400
        # Refused at once by the trigger service (Knative does not retry a 400 or 401): sending it again would
        # come straight back, so it is not stored.
        for status in ("400", "401"):
            refused = service.dead_letter(alarm(f"refused-{status}"), **{**UNREACHABLE, "ce-knativeerrorcode": status})
            assert refused.status_code == 204 and "which Knative does not retry" in refused.headers["x-kfloop-ignored"]
        # What Knative retried to the end (a 503, no answer at all) is stored: only that one reaches the sink.
        assert service.dead_letter(alarm("retried"), **{**UNREACHABLE, "ce-knativeerrorcode": "503"}).status_code == 202
        eventually(lambda: sink.events, what="the stored dead letter at the sink")
        time.sleep(0.5)  # the outbox sends in order: anything stored before would have come first
        assert [e["id"] for e in sink.events] == ["retried"]
        for outcome, count in (("requeued", 1), ("ignored", 2), ("dropped", 2), ("invalid", 4)):
            assert service.metric(f'kfloop_watch_dead_letters_total{{model="leaf",outcome="{outcome}"}}') == count, outcome
    finally:
        service.stop()
        sink.close()


def test_with_oidc_the_dead_letter_port_takes_only_the_knative_triggers_tokens(setup, tmp_path):
    """The cluster mode: broker-filter forwards a dead letter with a token of the Trigger's own ServiceAccount."""
    from test_oidc import AUDIENCE, TRIGGER, Issuer, signed

    issuer = Issuer()
    sink = EventSink()
    service = DeadLetterWatch(setup["registry"], sink.server.server_port, tmp_path / "state", extra=(
        "--dead-letter-auth", "oidc", "--oidc-issuer-url", issuer.url, "--oidc-audience", AUDIENCE, "--oidc-subject", TRIGGER))
    try:
        def bearer(token: str) -> dict[str, str]:
            return {"authorization": f"Bearer {token}"}

        assert service.dead_letter(alarm("a"), credentials={}).status_code == 401
        assert service.dead_letter(alarm("a"), credentials=service.auth).status_code == 401  # the home's token is no JWT
        assert service.dead_letter(alarm("a"), credentials=bearer(signed(aud=["leaf-trigger.ml"]))).status_code == 401
        assert service.dead_letter(alarm("a"), credentials=bearer(signed(sub="system:serviceaccount:ml:x"))).status_code == 403
        # No Host check in cluster mode: broker-filter calls the Service by its cluster DNS name.
        admitted = service.dead_letter(alarm("a"), credentials=bearer(signed()), host="leaf-watch.ml.svc.cluster.local:8081")
        assert admitted.status_code == 202
        assert eventually(lambda: sink.events, what="the dead letter at the sink")[0]["id"] == "a"
    finally:
        service.stop()
        sink.close()
        issuer.stop()


def test_on_a_cluster_labels_come_through_the_broker_to_the_oidc_port_with_the_labels_triggers_token(setup, tmp_path):
    """The cluster's label door: Knative's broker-filter forwards io.kfloop.label events to the dead-letter port with
    a token of the labels Trigger's ServiceAccount; they are kept as on the payload port (a label for an answer the
    watch has not seen is 404, which Knative retries); another subject's token is 403."""
    from test_oidc import AUDIENCE, TRIGGER, Issuer, signed

    labels_trigger = "system:serviceaccount:ml:leaf-watch-labels-oidc-eventing.knative.dev-trigger"
    issuer, sink = Issuer(), EventSink()
    service = DeadLetterWatch(setup["registry"], sink.server.server_port, tmp_path / "state", extra=(
        "--dead-letter-auth", "oidc", "--oidc-issuer-url", issuer.url, "--oidc-audience", AUDIENCE,
        "--oidc-subject", TRIGGER, "--oidc-subject", labels_trigger))
    try:
        rows = setup["rows"][:1]
        classes = ModelRegistry(setup["registry"]).metadata("leaf", "1")["classes"]
        label = lambda event_id, row_id: event(rows[:0], event_type="io.kfloop.label", event_id=event_id,  # noqa: E731
                                                data=[{"id": row_id, "label": classes[0]}])
        as_trigger = {"authorization": f"Bearer {signed(sub=labels_trigger)}"}
        assert service.dead_letter(label("early", "served-1"), credentials=as_trigger).status_code == 404  # not answered yet
        assert post(service, event(rows, event_id="served-1")).status_code == 202
        answer = event(rows, event_type=RESPONSE, event_id="served-1", data={"predictions": [classes[0]]})
        assert post(service, answer).status_code == 202
        taken = service.dead_letter(label("retried", "served-1"), credentials=as_trigger)
        assert taken.status_code == 202 and taken.headers["x-kfloop-labels"] == "accepted=1; duplicate=0"
        outsider = {"authorization": f"Bearer {signed(sub='system:serviceaccount:ml:someone')}"}
        assert service.dead_letter(label("again", "served-1"), credentials=outsider).status_code == 403
        assert service.dead_letter(label("again", "served-1"), credentials={}).status_code == 401
        assert service.status()["labels"]["accuracy"]["1"] == {"accuracy": 1.0, "labels": 1}
        assert sink.events == []  # labels are no alarms: nothing went to the Broker
        # The early label's 404 counts as a label for an unknown id, not as a malformed dead letter; the refused
        # credentials (403, 401) do count there: nobody's events are read without them.
        assert service.metric('kfloop_labels_total{model="leaf",outcome="unknown_id"}') == 1
        assert service.metric('kfloop_watch_dead_letters_total{model="leaf",outcome="invalid"}') == 2
    finally:
        service.stop()
        sink.close()
        issuer.stop()


def labels_of(service: Watch, body, **headers: str) -> httpx.Response:
    return httpx.post(service.url + "v2/models/leaf/labels", json=body, headers=service.auth | headers)


def test_labels_for_served_rows_give_realised_accuracy_are_joined_into_a_labelled_shard_and_survive_a_restart(setup, tmp_path):
    """Labels through both doors (REST and an io.kfloop.label CloudEvent), late, out of order, resent, for unknown ids and
    with unknown classes; what the watch keeps survives a restart."""
    registry = tmp_path / "registry"
    shutil.copytree(setup["registry"], registry)  # labelled shards of its own (besides those other tests left)
    earlier = set(ModelRegistry(registry).captures("leaf").labelled_shards())
    sink = EventSink()
    service = Watch(registry, sink.server.server_port, tmp_path / "state")
    try:
        rows = setup["rows"]
        classes = ModelRegistry(registry).metadata("leaf", "1")["classes"]
        assert post(service, event(rows[:1], event_id="one")).status_code == 202
        assert post(service, event(rows[1:4], event_id="three", protocol="v2")).status_code == 202
        answers = {"one": [classes[0]], "three": [classes[1], classes[2], classes[3]]}
        v1_answer = event(rows[:1], event_type=RESPONSE, event_id="one", data={"predictions": answers["one"]})
        v1_answer[0]["ce-modelversion"] = "1"
        assert post(service, v1_answer).status_code == 202
        v2_answer = {"id": "client-id", "model_name": "leaf", "model_version": "1",
                     "outputs": [{"name": "label", "datatype": "BYTES", "shape": [3], "data": answers["three"]}]}
        assert post(service, event(rows[1:4], event_type=RESPONSE, event_id="three", data=v2_answer)).status_code == 202
        shadow_answer = event(rows[1:4], event_type=RESPONSE, event_id="three",  # a shadow's answer to a mirrored copy
                              data={"predictions": [classes[1], classes[2], classes[7]]})
        shadow_answer[0].update({"ce-modelversion": "2", "ce-shadow": "true"})
        assert post(service, shadow_answer).status_code == 202
        assert service.status()["labels"]["agreement"] == {"2": {"agreement": 2 / 3, "answers": 3}}

        # The rows are still buffered (capture shards every 50 rows): labels are taken now, joined once written.
        assert httpx.post(service.url + "v2/models/leaf/labels", json=[{"id": "one", "label": classes[0]}]).status_code == 401
        assert labels_of(service, [{"id": "three:2", "label": classes[3]}, {"id": "one", "label": classes[0]}]).json() == \
            {"accepted": 2, "duplicate": 0}
        late = event(rows[:0], event_type="io.kfloop.label", data=[{"id": "three:0", "label": classes[9]}])
        taken = post(service, late)  # through the Broker's door: a CloudEvent (the label is wrong: answered classes[1])
        assert taken.status_code == 202 and taken.headers["x-kfloop-labels"] == "accepted=1; duplicate=0"
        assert labels_of(service, [{"id": "one", "label": classes[0]}]).json() == {"accepted": 0, "duplicate": 1}
        unknown = labels_of(service, [{"id": "nobody", "label": classes[0]}, {"id": "three:1", "label": classes[2]}])
        assert unknown.status_code == 404 and unknown.json()["error"].startswith("1 label(s) refused, none kept: 'nobody'")
        bad_class = labels_of(service, [{"id": "three:1", "label": "no-such-species"}])
        assert bad_class.status_code == 400 and "'no-such-species' is not a class of version 1" in bad_class.json()["error"]
        conflict = labels_of(service, [{"id": "one", "label": classes[5]}])
        assert conflict.status_code == 409
        assert labels_of(service, {"id": "one"}).status_code == 400
        assert httpx.post(service.url + "v2/models/leaf/labels", content=b"[]", headers=service.auth).status_code == 415
        assert labels_of(service, [{"id": "three:1", "label": classes[2]}]).json()["accepted"] == 1  # the refused batch's

        accuracy = service.status()["labels"]["accuracy"]
        assert accuracy == {"1": {"accuracy": 0.75, "labels": 4}, "2": {"accuracy": 1 / 3, "labels": 3}}  # the shadow's too
        assert service.metric('kfloop_realised_accuracy{model="leaf",version="1"}') == 0.75
        assert service.metric('kfloop_realised_accuracy_labels{model="leaf",version="1"}') == 4
        for outcome, count in (("unknown_id", 1), ("unknown_class", 1), ("conflict", 1), ("duplicate", 1), ("accepted", 4)):
            assert service.metric(f'kfloop_labels_total{{model="leaf",outcome="{outcome}"}}') == count, outcome

        assert post(service, event(rows[4:60])).status_code == 202  # 50 rows: the shard is written, the labels joined
        shards = eventually(lambda: set(ModelRegistry(registry).captures("leaf").labelled_shards()) - earlier, 20,
                            "a labelled shard")
        [shard] = shards
        joined = load_dataset(str(shard), target="label")
        assert sorted(zip(joined.ids.tolist(), joined.labels.tolist())) == sorted(
            [("one:0", classes[0]), ("three:0", classes[9]), ("three:1", classes[2]), ("three:2", classes[3])])
        np.testing.assert_allclose(joined.features[joined.ids.tolist().index("three:1")], rows[2], rtol=1e-6)

        service.crash()
        service = Watch(registry, sink.server.server_port, tmp_path / "state", port=service.port)
        assert service.status()["labels"]["accuracy"] == accuracy
        assert labels_of(service, [{"id": "three:0", "label": classes[9]}]).json() == {"accepted": 0, "duplicate": 1}
        assert set(ModelRegistry(registry).captures("leaf").labelled_shards()) - earlier == {shard}  # joined once
    finally:
        service.stop()
        sink.close()


def test_the_accuracy_rule_raises_one_alarm_when_the_serving_versions_labelled_answers_fall_below_the_threshold(setup, tmp_path):
    """Concept drift: the rows stay as they were (no drift alarm), the labels say the answers are wrong."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("model: leaf\naccuracy:\n  labels: 4\n  below: 0.8\n")
    registry = tmp_path / "registry"
    shutil.copytree(setup["registry"], registry)
    captures = ModelRegistry(registry).captures("leaf")
    earlier = set(captures.labelled_shards())
    sink = EventSink()
    service = Watch(registry, sink.server.server_port, tmp_path / "state", extra=("--policy", str(policy)))
    try:
        rows = setup["rows"][:8]
        classes = ModelRegistry(setup["registry"]).metadata("leaf", "1")["classes"]
        for i, row in enumerate(rows):
            assert post(service, event(row[None, :], event_id=f"r{i}")).status_code == 202
            answer = event(row[None, :], event_type=RESPONSE, event_id=f"r{i}", data={"predictions": [classes[0]]})
            assert post(service, answer).status_code == 202
        assert labels_of(service, [{"id": f"r{i}", "label": classes[0]} for i in range(3)]).status_code == 200
        assert labels_of(service, [{"id": "r3", "label": classes[1]}]).status_code == 200  # 3 of 4: 0.75 < 0.8
        [alarm] = eventually(lambda: [e for e in sink.events if e["type"] == ACCURACY_EVENT], 10, "an accuracy alarm")
        assert (alarm.data["model"], alarm.data["version"], alarm.data["labels"]) == ("leaf", "1", 4)
        assert alarm.data["accuracy"] == 0.75 and alarm.data["below"] == 0.8
        # Stored only once the labels behind it were joined (their rows were still buffered): the retraining it
        # starts reads them as a labelled shard.
        joined = [load_dataset(str(shard), target="label") for shard in set(captures.labelled_shards()) - earlier]
        assert sorted((i, label) for data in joined for i, label in zip(data.ids.tolist(), data.labels.tolist())) == \
            [("r0:0", classes[0]), ("r1:0", classes[0]), ("r2:0", classes[0]), ("r3:0", classes[1])]
        labels_of(service, [{"id": f"r{i}", "label": classes[1]} for i in (4, 5)])  # still low: no second alarm
        time.sleep(1.0)
        assert [e["type"] for e in sink.events] == [ACCURACY_EVENT]  # and no drift alarm: the rows are clean
        assert service.metric('kfloop_watch_alarms_total{kind="accuracy",model="leaf"}') == 1
    finally:
        service.stop()
        sink.close()
