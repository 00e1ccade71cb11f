"""Hypothesis-generated CloudEvents at a real ``kfloop watch`` and a real ``kfloop trigger`` process on loopback:
no delivery gets a 5xx, and no sender without the home's token (or reaching the server under a name that is not
loopback) moves a window, raises an alarm, writes a capture or starts a run.

Each example is one delivery -- binary mode (``ce-*`` headers: valid, missing, duplicated, odd, non-ASCII or
up to 70 KB long; other spec versions; any content type) or structured mode (``application/cloudevents+json``
or another type; valid or broken JSON, a non-object, data of any JSON shape, ``data_base64``), sometimes
chunked, sometimes over the 16 MiB body limit -- sent four times: without credentials, with a wrong bearer
token, with another scheme and with the right token, all through one ``Host`` header that names loopback or
not. The refusal is checked exactly (a foreign ``Host``: 403 whatever the credentials; no ``Authorization``
or another scheme: 401; a wrong token: 403), and so is the set a token holder can get
(:data:`TOKEN_HOLDER_ANSWERS`).

Both services run as the CLI processes a user starts (``--home`` gives them their token), not in a thread:
the fuzz then also covers the CLI's wiring of the authenticator and uvicorn's own HTTP parsing, and a process
costs only its start-up (a few seconds) while a loopback request takes about a millisecond either way.

* The watch gets a window no example can fill (:data:`UNFILLABLE_WINDOW`) and no timer, so it tests no window
  and raises no alarm by itself: ``/status`` (rows in the window, windows tested, last alarm, outbox) then
  changes only on an accepted delivery, before the answer, and any alarm at its :class:`~testbed.EventSink`,
  or any captured row beyond those of the token holder's accepted events, would be a forged one.
* The trigger starts with the day's budget spent: its state file (the memory it keeps across restarts) holds
  one run that started now, and its policy allows one run a day (``max_runs_per_day`` must be >= 1, so a
  budget of 0 cannot be written). An authenticated drift alarm for its model is then admitted for real and
  refused by the budget (``x-kfloop-outcome: budget``) instead of starting a kfp.local run that takes minutes.

Run with ``-s`` for one summary line per target: examples, requests and the statuses per kind of sender.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testbed import DRIFT, EventSink, Trigger, wait_until_answering, write_policy
from kfloop.credentials import local_token
from kfloop.event_types import OUTLIER_EVENT, REQUEST_EVENT, RESPONSE_EVENT
from kfloop.local.supervisor import free_port
from kfloop.registry import ModelRegistry
from kfloop.serving.events import IGNORED_HEADER
from kfloop.serving.limits import DEFAULT_MAX_BODY_BYTES
from kfloop.serving.trigger import OUTCOME_HEADER

pytestmark = pytest.mark.slow

EXAMPLES = 200
UNFILLABLE_WINDOW = 1_000_000  # far more rows than the fuzz sends: no window is ever tested
WATCH_STATE = ("version", "rows_in_window", "windows_tested", "last_window", "last_alarm", "outbox")  # of /status
TOKEN_HOLDER_ANSWERS = {
    202: "accepted (the watch: rows taken or a redelivery; the trigger: admitted, and refused by the budget)",
    204: "ignored (another event type, another model)",
    400: "not a CloudEvent, or data the service cannot use",
    413: "a body over the limit",
}
SPENT_BUDGET_OUTCOMES = {"budget", "duplicate"}  # with the day's one run spent, nothing else may come of an alarm
CREDENTIALS = ("none", "wrong bearer", "wrong scheme", "right token")
# Names a page can give its own server and then rebind to 127.0.0.1: they start like a loopback address.
REBINDING_HOSTS = ["127.0.0.1.nip.io", "127.attacker.example:{port}"]


# --- the servers -------------------------------------------------------------------------------------------


class WatchTarget:
    """A real ``kfloop watch`` of model ``digits`` whose window the fuzz cannot fill, its alarm sink, and what
    an accepted event may change."""

    name = "watch"
    types = st.sampled_from([REQUEST_EVENT] * 4 + [RESPONSE_EVENT, DRIFT])

    def __init__(self, tmp_path: Path, registry: Path) -> None:
        self.registry, home = registry, tmp_path / "home"
        self.token = local_token(home)
        self.n_features = len(ModelRegistry(registry).metadata("digits", "1")["feature_names"])
        self.data = rows(self.n_features)
        self.sink = EventSink()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kfloop", "watch", "--registry", str(registry), "--model", "digits", "--home", str(home),
             "--sink", self.sink.url, "--http-port", str(self.port), "--window", str(UNFILLABLE_WINDOW),
             "--stride-seconds", "0", "--capture-rows", "100000", "--state-dir", str(home / "watch")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.client = httpx.Client(timeout=30)  # one client: a new one per call costs ~30 ms (its TLS context)
        wait_until_answering(self.url + "/healthz", "watch", 60)

    def status(self) -> dict:
        return self.client.get(self.url + "/status").json()

    def observe(self) -> tuple[dict, int]:
        """What an event can move (the window, its tests, alarms) and the alarms at the sink."""
        status = self.status()
        return {key: status[key] for key in WATCH_STATE}, len(self.sink.events)

    def check_accepted(self, answer: httpx.Response, before: tuple[dict, int], after: tuple[dict, int]) -> None:
        """Rows joined the window (none for a redelivery); nothing was tested or raised."""
        assert after[0]["rows_in_window"] >= before[0]["rows_in_window"], answer.headers
        assert {**after[0], "rows_in_window": 0} == {**before[0], "rows_in_window": 0}
        assert after[1] == before[1] == 0

    def good_delivery(self) -> dict:
        """A payload event the watch takes: two rows, binary mode."""
        attributes = {"ce-specversion": "1.0", "ce-id": f"good-{time.time_ns()}", "ce-source": "test", "ce-type": REQUEST_EVENT}
        body = dumps({"instances": [[0.0] * self.n_features] * 2})
        return {"headers": [*attributes.items(), ("content-type", "application/json")], "body": body, "chunked": False}

    def stop(self) -> int:
        """Stop the process (it writes its capture buffer first); its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)

    def close(self) -> None:
        self.stop()
        self.sink.close()
        self.client.close()


class TriggerTarget:
    """A real ``kfloop trigger`` for model ``digits`` whose budget for the day is spent, and what an accepted
    alarm may change."""

    name = "trigger"
    types = st.sampled_from([DRIFT] * 3 + [OUTLIER_EVENT, REQUEST_EVENT])

    def __init__(self, tmp_path: Path, registry: Path, data_uri: str) -> None:
        home = tmp_path / "home"
        self.state = home / "trigger" / "trigger-state.json"  # where testbed's Trigger (--state-dir) keeps it
        self.state.parent.mkdir(parents=True)
        now = time.time()
        self.spent = {"id": "spent", "event_id": "earlier-alarm", "event_type": DRIFT, "queued": now, "started": now,
                      "finished": now, "outcome": "rejected", "charged": True}
        self.state.write_text(json.dumps({"seen": ["earlier-alarm"], "pending": [], "runs": [self.spent]}))
        self.trigger = Trigger(home, registry, write_policy(tmp_path / "policy.yaml", data_uri, max_runs_per_day=1))
        self.token, self.url, self.port = local_token(home), self.trigger.url, self.trigger.port
        self.data = alarms("digits")
        self.client = httpx.Client(timeout=30)

    def observe(self) -> tuple[list, list, bytes]:
        status = self.client.get(self.url + "/status").json()
        return status["pending"], status["runs"], self.state.read_bytes()

    def check_accepted(self, answer: httpx.Response, before: tuple, after: tuple) -> None:
        """Admitted and refused by the budget (or a redelivery): no run pending, none started."""
        assert answer.headers[OUTCOME_HEADER] in SPENT_BUDGET_OUTCOMES, answer.headers
        assert after[:2] == before[:2] == ([], [self.spent])

    def good_delivery(self) -> dict:
        """A drift alarm for ``digits`` as the watch sends it, binary mode."""
        attributes = {"ce-specversion": "1.0", "ce-id": f"good-{time.time_ns()}", "ce-source": "kfloop/watch/digits",
                      "ce-type": DRIFT}
        return {"headers": [*attributes.items(), ("content-type", "application/json")],
                "body": dumps({"model": "digits", "kind": "drift"}), "chunked": False}

    def close(self) -> None:
        self.trigger.stop()
        self.client.close()


# --- what is sent ------------------------------------------------------------------------------------------


def dumps(value: Any) -> bytes:
    """JSON as Python writes it: integers of any size, and NaN/Infinity (not JSON) as they come."""
    return json.dumps(value).encode()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
# Header values h11 lets a client send: no control characters, no surrounding blanks; non-ASCII as UTF-8 bytes.
header_texts = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=40).map(lambda s: s.strip(" \t"))
header_values = (
    header_texts.map(str.encode)
    | st.sampled_from([b"1.0", b"1.0.0", b"0.3", b"1", b"", b"\xff\xfe", "caf\u00e9".encode(), "\u2603".encode()])
)
event_ids = st.sampled_from(["e-1", "e-2", "same"]) | st.uuids().map(str) | header_texts.filter(bool)
content_types = st.sampled_from([
    None, "application/json", "application/json; charset=utf-8", "text/plain", "text/plain; charset=utf-8",
    "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/cloudevents+json",
    "application/cloudevents+json; charset=utf-8", "application/cloudevents-batch+json", "application/octet-stream",
    "application/xml", "", "json",
]) | header_texts
extension_names = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=12).map(lambda s: "ce-" + s)


def rows(n_features: int) -> st.SearchStrategy:
    """V1 or V2 bodies: well-formed rows of the model's width (accepted) and nearly well-formed ones."""
    finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)
    row = st.lists(finite, min_size=n_features, max_size=n_features)
    valid_v1 = st.lists(row, min_size=1, max_size=3).map(lambda r: {"instances": r})
    valid_v2 = st.lists(row, min_size=1, max_size=3).map(lambda r: {"inputs": [
        {"name": "features", "shape": [len(r), n_features], "datatype": "FP32", "data": [v for x in r for v in x]}]})
    near_v1 = st.fixed_dictionaries({"instances": st.lists(st.lists(st.floats() | json_values, max_size=5) | json_values,
                                                           max_size=4) | json_values})
    near_v2 = st.fixed_dictionaries({"inputs": st.lists(st.fixed_dictionaries({
        "name": st.sampled_from(["features", "pixel_0_0"]) | json_values,
        "datatype": st.sampled_from(["FP32", "FP64", "BYTES"]) | json_values,
        "shape": st.lists(st.integers(-2, 300) | json_values, max_size=3) | json_values,
        "data": st.lists(st.floats() | st.integers(-10**40, 10**40), max_size=20) | json_values,
    }), max_size=2) | json_values})
    return st.one_of(valid_v1, valid_v2, near_v1 | near_v2 | json_values)


def alarms(model: str) -> st.SearchStrategy:
    """Alarm data as the watch sends it, for this model or another, and any other JSON."""
    return st.fixed_dictionaries(
        {"model": st.sampled_from([model, model, "other"]) | json_values},
        optional={"kind": st.sampled_from(["drift", "outlier"]) | json_values, "version": json_values},
    ) | json_values


ATTRIBUTES = ("specversion", "id", "source", "type")
FAULTS = (*ATTRIBUTES, "extras", "huge", "body", "content-type", "payload")
# Bytes of one header value: around and past the common 8 and 16 KiB limits. Not longer: an ignored event's type
# comes back in x-kfloop-ignored, and an answer's headers over 100 KiB are more than httpx reads.
HUGE = [4_000, 9_000, 17_000, 70_000]
OVERSIZE = [False] * 24 + [True]  # now and then a body over the limit (sampled: an integer draw would favour its ends)


@st.composite
def deliveries(draw: st.DrawFn, types: st.SearchStrategy, data: st.SearchStrategy) -> dict[str, Any]:
    """One HTTP delivery, ``{"mode", "headers" (a list of pairs), "body", "chunked"}``: intact half the time,
    else with some of :data:`FAULTS` (an attribute missing or odd, extra or duplicated attributes, a body that
    is not what it says, another content type, ``data_base64`` or no data)."""
    valid = {"specversion": "1.0", "id": draw(event_ids), "source": "fuzz", "type": draw(types)}
    faults = set() if draw(st.booleans()) else draw(st.sets(st.sampled_from(FAULTS), min_size=1, max_size=4))
    mode = draw(st.sampled_from(["binary", "structured"]))
    if mode == "binary":
        headers: list[tuple[str, str | bytes]] = []
        for name, value in valid.items():
            if name not in faults:
                headers.append((f"ce-{name}", value))
            elif draw(st.booleans()):  # odd, else missing
                headers.append((f"ce-{name}", draw(header_values)))
        if "extras" in faults:  # duplicates and extensions
            names = extension_names | st.sampled_from([f"ce-{name}" for name in ATTRIBUTES] + ["ce-datacontenttype"])
            headers += draw(st.lists(st.tuples(names, header_values), min_size=1, max_size=3))
        if "huge" in faults:
            headers.append((draw(extension_names | st.sampled_from(["ce-id", "ce-type", "ce-source"])),
                            b"x" * draw(st.sampled_from(HUGE))))
        if faults & {"body", "payload"}:
            body = draw(st.one_of(st.binary(max_size=64), st.just(b""), data.map(lambda d: dumps(d)[:-1])))  # [:-1]: broken JSON
        else:
            body = dumps(draw(data))
        content_type = draw(content_types if "content-type" in faults
                            else st.sampled_from([None, "application/json", "application/json; charset=utf-8"]))
    else:
        document: dict[str, Any] = {}
        for name, value in valid.items():
            if name not in faults:
                document[name] = value
            elif draw(st.booleans()):
                document[name] = draw(json_values | header_texts)
        if "huge" in faults:
            document[draw(st.sampled_from(["id", "type", "source", "subject"]))] = "x" * draw(st.sampled_from(HUGE))
        if "extras" in faults:
            document |= draw(st.dictionaries(st.sampled_from(["datacontenttype", "subject", "time", "dataschema"])
                                             | st.text(max_size=8), json_values, min_size=1, max_size=3))
        payload = draw(st.sampled_from(["data_base64", "both", "none"])) if "payload" in faults else "data"
        if payload in ("data", "both"):
            document["data"] = draw(data)
        if payload in ("data_base64", "both"):
            document["data_base64"] = draw(data.map(lambda d: base64.b64encode(dumps(d)).decode()) | json_values)
        body = dumps(document)
        if "body" in faults:
            body = draw(st.one_of(st.just(body[:-1]), json_values.map(dumps), st.binary(max_size=64)))  # broken, not an object
        content_type = draw(content_types if "content-type" in faults
                            else st.sampled_from(["application/cloudevents+json", "application/cloudevents+json; charset=utf-8"]))
        headers = []
    if content_type is not None:
        headers.append(("content-type", content_type))
    if draw(st.sampled_from(OVERSIZE)):
        body += b" " * (DEFAULT_MAX_BODY_BYTES + 1 - len(body))
    return {"mode": mode, "headers": headers, "body": body, "chunked": draw(st.booleans())}


loopback_hosts = st.sampled_from(["127.0.0.1", "localhost", "[::1]", "127.0.0.2"]).flatmap(
    lambda host: st.sampled_from([host, f"{host}:{{port}}"]))
foreign_hosts = st.sampled_from([
    "attacker.example", "attacker.example:{port}", "localhost.attacker.example",
    "0.0.0.0:{port}", "10.0.0.7", "LOCALHOST", "localhost.", "[::ffff:127.0.0.1]",
])
token_characters = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"  # what secrets.token_urlsafe writes
wrong_bearers = st.text(token_characters, min_size=1, max_size=60) | header_texts.filter(bool)


def credentials(token: str, wrong_bearer: str, wrong_scheme: int, right_scheme: int) -> dict[str, str | None]:
    """The ``Authorization`` header of each kind of sender (None: none sent)."""
    return {
        "none": None,
        "wrong bearer": f"Bearer {wrong_bearer}",
        "wrong scheme": [f"Basic {token}", f"Token {token}", token, "Bearer", f"Bearer{token}",
                         "Basic dXNlcjpwdw=="][wrong_scheme],
        "right token": [f"Bearer {token}", f"bearer {token}", f"BEARER  {token}"][right_scheme],
    }


def expected_refusal(credential: str, foreign_host: bool) -> int | None:
    """The exact status a sender must get, or None for the token holder on loopback."""
    if foreign_host:
        return 403  # the Host check comes first, whatever the credentials
    return {"none": 401, "wrong scheme": 401, "wrong bearer": 403, "right token": None}[credential]


# --- the fuzz ----------------------------------------------------------------------------------------------


def send(target: WatchTarget | TriggerTarget, delivery: dict, host: str, authorization: str | None) -> httpx.Response:
    headers = [(name, value.encode() if isinstance(value, str) else value) for name, value in delivery["headers"]]
    headers.append(("host", host))
    if authorization is not None:
        headers.append(("authorization", authorization.encode()))
    body = delivery["body"]
    content = iter([body[i:i + 65536] for i in range(0, len(body), 65536)]) if delivery["chunked"] else body
    return target.client.post(target.url + "/", headers=headers, content=content)


def check(target: WatchTarget | TriggerTarget, delivery: dict, host: str, foreign: bool, credential: str,
          authorization: str | None) -> int:
    """Send one delivery and check the answer and what the server did; the status."""
    before = target.observe()
    answer = send(target, delivery, host, authorization)
    after = target.observe()
    status, what = answer.status_code, (credential, host, answer.status_code, answer.headers, answer.content[:300])
    assert status < 500, what
    assert not [name for name in answer.headers if name.lower().startswith("ce-")], what  # never a CloudEvent back
    refusal = expected_refusal(credential, foreign)
    if refusal is not None:
        assert status == refusal, what
        assert orjson.loads(answer.content)["error"], what
        if status == 401:
            assert answer.headers["www-authenticate"].startswith("Bearer"), what
        assert OUTCOME_HEADER not in answer.headers and IGNORED_HEADER not in answer.headers, what
        assert after == before, what  # nothing acted
        return status
    assert status in TOKEN_HOLDER_ANSWERS, what
    if status == 202:
        assert answer.content == b"", what
        target.check_accepted(answer, before, after)
        return status
    assert after == before, what
    assert OUTCOME_HEADER not in answer.headers, what
    if status == 204:
        assert answer.content == b"" and answer.headers[IGNORED_HEADER], what
    else:
        assert orjson.loads(answer.content)["error"], what
    return status


def fuzz(target: WatchTarget | TriggerTarget) -> None:
    """Every example sent by every kind of sender and checked; the statuses per kind printed as one line."""
    statuses: dict[str, Counter] = {credential: Counter() for credential in CREDENTIALS}
    examples = 0
    hosts = st.one_of(loopback_hosts.map(lambda h: (h, False)), foreign_hosts.map(lambda h: (h, True)))

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(delivery=deliveries(target.types, target.data), host=hosts, wrong_bearer=wrong_bearers,
           wrong_scheme=st.integers(0, 5), right_scheme=st.integers(0, 2))
    def probe(delivery: dict, host: tuple[str, bool], wrong_bearer: str, wrong_scheme: int, right_scheme: int) -> None:
        nonlocal examples
        examples += 1
        if wrong_bearer == target.token:
            wrong_bearer += "x"
        for credential, authorization in credentials(target.token, wrong_bearer, wrong_scheme, right_scheme).items():
            status = check(target, delivery, host[0].format(port=target.port), host[1], credential, authorization)
            statuses[credential][status] += 1

    try:
        probe()
    finally:
        requests = sum(sum(counts.values()) for counts in statuses.values())
        parts = "; ".join(f"{credential} {dict(sorted(counts.items()))}" for credential, counts in statuses.items())
        # stderr: pytest-xdist relays a worker's stderr under -s, not its stdout
        print(f"\n{target.name} fuzz: {examples} examples, {requests} requests; {parts}", file=sys.stderr)


@pytest.fixture
def watch(tmp_path, registry_with_weak_v1):
    target = WatchTarget(tmp_path, registry_with_weak_v1[0])
    yield target
    target.close()


@pytest.fixture
def trigger(tmp_path, registry_with_weak_v1):
    registry, _, full = registry_with_weak_v1
    target = TriggerTarget(tmp_path, registry, full)
    yield target
    target.close()


def test_no_cloudevent_makes_the_watch_answer_5xx_or_act_for_a_sender_without_the_token(watch):
    fuzz(watch)
    assert check(watch, watch.good_delivery(), "127.0.0.1", False, "right token", f"Bearer {watch.token}") == 202
    assert watch.client.get(watch.url + "/healthz").status_code == 200
    final = watch.status()
    assert final["rows_in_window"] >= 2
    assert (final["windows_tested"], final["last_alarm"], final["outbox"]) == (0, None, 0)
    assert watch.stop() in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its clean shutdown
    # What the watch captured (the next training data) is exactly what it accepted from the token holder.
    area = ModelRegistry(watch.registry).captures("digits")
    assert sum(len(area.read(shard).ids) for shard in area.captured_shards()) == final["rows_in_window"]
    assert watch.sink.events == []


def test_no_cloudevent_makes_the_trigger_answer_5xx_or_start_a_run(trigger):
    fuzz(trigger)
    assert check(trigger, trigger.good_delivery(), "localhost", False, "right token", f"Bearer {trigger.token}") == 202
    assert trigger.client.get(trigger.url + "/healthz").status_code == 200
    status = trigger.client.get(trigger.url + "/status").json()
    assert (status["pending"], status["runs"]) == ([], [trigger.spent])


@pytest.mark.parametrize("name", ["watch", "trigger"])
def test_the_token_through_a_name_that_only_starts_like_a_loopback_address_is_refused(request, name):
    """DNS rebinding: a page's own name that begins with ``127.`` is not loopback; the answer is 403 and nothing acts."""
    target = request.getfixturevalue(name)
    answers = {}
    for host in REBINDING_HOSTS:
        before = target.observe()
        answer = send(target, target.good_delivery(), host.format(port=target.port), f"Bearer {target.token}")
        answers[host] = (answer.status_code, "acted" if target.observe() != before else "nothing acted")
    assert answers == {host: (403, "nothing acted") for host in REBINDING_HOSTS}
