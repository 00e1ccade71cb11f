"""The durable outbox against a real HTTP sink on 127.0.0.1 whose answers are scripted per event id."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from collections.abc import Callable

import numpy as np
import pytest
from prometheus_client import REGISTRY

from kfloop.event_types import DRIFT_EVENT
from kfloop.retry import Backoff
from kfloop.serving.outbox import Outbox

FAST = Backoff((0.05, 0.1), jitter=0.5)  # back-off for tests: 50 ms, then at most 100 ms


class ScriptedSink:
    """An HTTP sink that answers each event by its ``ce-id``: the scripted statuses in turn, then 202."""

    def __init__(self, script: dict[str, list[int]] | None = None, port: int = 0) -> None:
        self.script = {key: list(value) for key, value in (script or {}).items()}
        self.requests: list[tuple[str, int, dict[str, str], bytes]] = []  # (ce-id, answered status, headers, body)
        self._lock = threading.Lock()
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                event_id = self.headers.get("ce-id", "")
                with sink._lock:
                    statuses = sink.script.get(event_id) or []
                    status = statuses.pop(0) if statuses else 202
                    sink.requests.append((event_id, status, {k.lower(): v for k, v in self.headers.items()}, body))
                answer = b"" if status < 300 else f"scripted {status} for {event_id}".encode()
                self.send_response(status)
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/"

    def answers(self, event_id: str) -> list[int]:
        with self._lock:
            return [status for seen, status, _, _ in self.requests if seen == event_id]

    def delivered(self) -> list[str]:
        """Ids answered 2xx, in the order the sink took them."""
        with self._lock:
            return [seen for seen, status, _, _ in self.requests if 200 <= status < 300]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def sinks():
    """Start sinks with ``sinks(script, port=0)``; every one is stopped after the test."""
    started: list[ScriptedSink] = []

    def start(script: dict[str, list[int]] | None = None, port: int = 0) -> ScriptedSink:
        sink = ScriptedSink(script, port)
        started.append(sink)
        return sink

    yield start
    for sink in started:
        sink.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def outbox_at(folder: Path, url: str) -> Outbox:
    return Outbox(folder, url, name=f"test-{uuid.uuid4().hex[:8]}", backoff=FAST, timeout=2.0, error_pause=0.05)


def metric(name: str, outbox: Outbox, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, {"outbox": outbox.name, **labels}) or 0.0


@contextlib.asynccontextmanager
async def running(outbox: Outbox):
    """Run the outbox's delivery loop for the block; it must still be running at the end, then it is cancelled."""
    task = asyncio.create_task(outbox.run())
    try:
        yield task
        await asyncio.sleep(0)
        assert not task.done(), f"run() ended: {task.exception() if not task.cancelled() else 'cancelled'}"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(condition: Callable[[], bool], what: str, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {what}")
        await asyncio.sleep(0.01)


def alarm(outbox: Outbox, n: int) -> str:
    return outbox.put(DRIFT_EVENT, "kfloop/watch/test", {"n": n})


# --- permanent refusals ---------------------------------------------------------------------------


def test_a_refused_alarm_goes_to_dead_letter_and_does_not_hold_back_the_next(tmp_path, sinks, caplog):
    sink = sinks()
    outbox = outbox_at(tmp_path / "outbox", sink.url)
    refused = alarm(outbox, 1)
    sink.script[refused] = [400]
    refused_file = outbox.pending()[0]
    following = alarm(outbox, 2)

    async def scenario() -> None:
        async with running(outbox):
            await until(lambda: following in sink.delivered(), "the next alarm delivered")
            await until(lambda: not outbox.pending(), "the outbox emptied")
            later = alarm(outbox, 3)  # alarms keep flowing after a refusal
            await until(lambda: later in sink.delivered() and not outbox.pending(), "a later alarm delivered")

    with caplog.at_level(logging.WARNING, logger="kfloop.serving.outbox"):
        asyncio.run(scenario())

    assert sink.answers(refused) == [400], "a permanent refusal is not retried"
    assert [seen for seen, *_ in sink.requests][:2] == [refused, following], "oldest first"
    assert outbox.pending() == []
    assert [path.name for path in outbox.dead_lettered()] == [refused_file.name]
    kept = json.loads(outbox.dead_lettered()[0].read_text())
    assert kept["id"] == refused and kept["data"] == {"n": 1}
    reason = json.loads((tmp_path / "outbox" / "dead-letter" / f"{refused_file.stem}.reason.json").read_text())
    assert reason["status"] == 400 and reason["body"] == f"scripted 400 for {refused}"
    assert any("refused" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert metric("kfloop_outbox_deliveries_total", outbox, outcome="dead_lettered") == 1
    assert metric("kfloop_outbox_deliveries_total", outbox, outcome="sent") == 2
    assert metric("kfloop_outbox_dead_lettered", outbox) == 1
    assert metric("kfloop_outbox_size", outbox) == 0


# --- temporary failures ---------------------------------------------------------------------------


def test_an_unreachable_then_failing_sink_is_retried_until_it_recovers_with_the_same_id(tmp_path, sinks):
    port = free_port()
    outbox = outbox_at(tmp_path / "outbox", f"http://127.0.0.1:{port}/")
    event_id = alarm(outbox, 1)
    holder: list[ScriptedSink] = []

    async def scenario() -> None:
        async with running(outbox):
            await until(lambda: metric("kfloop_outbox_deliveries_total", outbox, outcome="failed") >= 2,
                        "two failed attempts while the sink is down")
            assert len(outbox.pending()) == 1
            holder.append(sinks({event_id: [503, 503]}, port=port))  # up, but failing twice
            await until(lambda: not outbox.pending(), "the event delivered once the sink recovered")

    asyncio.run(scenario())
    sink = holder[0]
    assert sink.answers(event_id) == [503, 503, 202]
    assert {seen for seen, *_ in sink.requests} == {event_id}, "the same ce-id on every attempt"
    assert len({body for *_, body in sink.requests}) == 1, "the same body on every attempt"
    headers = sink.requests[-1][2]
    assert headers["ce-type"] == DRIFT_EVENT and headers["ce-source"] == "kfloop/watch/test"
    assert headers["content-type"] == "application/json" and json.loads(sink.requests[-1][3]) == {"n": 1}
    assert outbox.dead_lettered() == []
    assert metric("kfloop_outbox_deliveries_total", outbox, outcome="sent") == 1
    assert metric("kfloop_outbox_size", outbox) == 0


@pytest.mark.parametrize("status", [429, 408, 500, 503])
def test_a_temporary_answer_is_retried_not_dead_lettered(tmp_path, sinks, status):
    sink = sinks()
    outbox = outbox_at(tmp_path / "outbox", sink.url)
    event_id = alarm(outbox, 1)
    sink.script[event_id] = [status, status]

    async def scenario() -> None:
        async with running(outbox):
            await until(lambda: event_id in sink.delivered() and not outbox.pending(),
                        "the event delivered after two temporary answers")

    asyncio.run(scenario())
    assert sink.answers(event_id) == [status, status, 202]
    assert outbox.pending() == [] and outbox.dead_lettered() == []
    assert metric("kfloop_outbox_deliveries_total", outbox, outcome="failed") == 2
    assert metric("kfloop_outbox_deliveries_total", outbox, outcome="dead_lettered") == 0


def test_an_event_that_keeps_failing_does_not_hold_back_the_others(tmp_path, sinks):
    sink = sinks()
    outbox = outbox_at(tmp_path / "outbox", sink.url)
    stuck = alarm(outbox, 1)
    sink.script[stuck] = [503] * 10_000
    others = [alarm(outbox, n) for n in range(2, 6)]

    async def scenario() -> None:
        async with running(outbox):
            await until(lambda: set(others) <= set(sink.delivered()), "the other events delivered")
            more = alarm(outbox, 6)
            await until(lambda: more in sink.delivered(), "an event put while one keeps failing delivered")
            await until(lambda: len(sink.answers(stuck)) >= 3 and len(outbox.pending()) == 1, "the stuck event still retried")

    asyncio.run(scenario())
    assert sink.delivered()[:4] == others, "the due events go oldest first"
    assert [json.loads(path.read_text())["id"] for path in outbox.pending()] == [stuck]
    assert outbox.dead_lettered() == []


# --- corrupt files --------------------------------------------------------------------------------


def test_corrupt_files_are_quarantined_and_later_events_still_flow(tmp_path, sinks):
    sink = sinks()
    folder = tmp_path / "outbox"
    outbox = outbox_at(folder, sink.url)
    (folder / "00000000T000000000001-garbage.json").write_text("{not json")
    (folder / "00000000T000000000002-keys.json").write_text(json.dumps({"id": "x", "type": "t"}))
    (folder / "00000000T000000000003-list.json").write_text("[1, 2]")
    (folder / "00000000T000000000004-binary.json").write_bytes(b"\xff\xfe\x00")
    good = alarm(outbox, 1)

    async def scenario() -> None:
        async with running(outbox):
            await until(lambda: good in sink.delivered(), "the good event delivered")
            later = alarm(outbox, 2)
            await until(lambda: later in sink.delivered() and not outbox.pending(), "a later event delivered")

    asyncio.run(scenario())
    assert outbox.pending() == []
    assert [path.name for path in outbox.quarantined()] == [
        "00000000T000000000001-garbage.json", "00000000T000000000002-keys.json",
        "00000000T000000000003-list.json", "00000000T000000000004-binary.json",
    ]
    assert (folder / "quarantine" / "00000000T000000000001-garbage.json").read_text() == "{not json"
    reason = json.loads((folder / "quarantine" / "00000000T000000000002-keys.reason.json").read_text())
    assert "source" in reason["problem"] and "data" in reason["problem"]
    assert len(sink.requests) == 2, "nothing corrupt reached the sink"
    assert metric("kfloop_outbox_deliveries_total", outbox, outcome="quarantined") == 4
    assert metric("kfloop_outbox_quarantined", outbox) == 4


# --- supervision ----------------------------------------------------------------------------------


def test_the_loop_survives_an_error_handling_one_file_and_retries_it(tmp_path, sinks, caplog):
    sink = sinks()
    folder = tmp_path / "outbox"
    outbox = outbox_at(folder, sink.url)
    (folder / "00000000T000000000000-garbage.json").write_text("{not json")
    (folder / "quarantine").write_text("a file where the quarantine folder should be")
    good = alarm(outbox, 1)

    async def scenario() -> None:
        async with running(outbox):
            await until(lambda: good in sink.delivered(), "the good event delivered despite the error")
            await until(lambda: any(r.exc_info for r in caplog.records), "the error logged with its traceback")
            (folder / "quarantine").unlink()
            await until(lambda: len(outbox.quarantined()) == 1 and not outbox.pending(),
                        "the corrupt file quarantined once it can be")

    with caplog.at_level(logging.WARNING, logger="kfloop.serving.outbox"):
        asyncio.run(scenario())
    assert outbox.pending() == []


# --- storing --------------------------------------------------------------------------------------


def test_put_stores_one_parseable_file_per_event_in_order_and_no_temporaries(tmp_path):
    folder = tmp_path / "outbox"
    outbox = outbox_at(folder, "http://127.0.0.1:9/")
    first = outbox.put(DRIFT_EVENT, "kfloop/watch/leaf", {"p": np.float64(0.25), "rows": np.arange(3)})
    assert [path.name for path in folder.iterdir()] == [outbox.pending()[0].name]
    record = json.loads(outbox.pending()[0].read_text())
    assert record["id"] == first and record["type"] == DRIFT_EVENT
    assert record["source"] == "kfloop/watch/leaf" and record["data"] == {"p": 0.25, "rows": [0, 1, 2]}
    assert record["time"].endswith("+00:00")

    ids = [outbox.put("t", "s", {"n": n}) for n in range(50)]
    assert outbox.put("t", "s", {}, event_id="given/../id") == "given/../id"
    files = list(folder.iterdir())
    assert all(path.parent == folder and path.suffix == ".json" and not path.name.startswith(".") for path in files)
    assert len(files) == 52 == len(outbox.pending())
    assert [json.loads(path.read_text())["id"] for path in outbox.pending()][1:51] == ids, "names sort in put order"
    assert metric("kfloop_outbox_size", outbox) == 52


def test_a_restarted_outbox_drops_stale_temporaries_and_keeps_the_events(tmp_path):
    folder = tmp_path / "outbox"
    outbox = outbox_at(folder, "http://127.0.0.1:9/")
    event_id = alarm(outbox, 1)
    stale = folder / ".20240101T000000000000-x.json.tmp-abcd1234"
    stale.write_text('{"id": "half')
    old = time.time() - 3600
    os.utime(stale, (old, old))
    fresh = folder / ".20240101T000000000001-y.json.tmp-abcd1234"
    fresh.write_text("{")
    again = outbox_at(folder, "http://127.0.0.1:9/")
    assert not stale.exists() and fresh.exists(), "only a temporary older than a minute is a crash's leftover"
    assert [json.loads(path.read_text())["id"] for path in again.pending()] == [event_id]


def test_events_stored_while_the_sink_was_down_are_delivered_once_each_after_a_restart(tmp_path, sinks):
    port = free_port()
    folder = tmp_path / "outbox"
    before = outbox_at(folder, f"http://127.0.0.1:{port}/")
    ids = [alarm(before, n) for n in range(3)]

    async def outage() -> None:
        async with running(before):
            await until(lambda: metric("kfloop_outbox_deliveries_total", before, outcome="failed") >= 3,
                        "every event tried while the sink is down")

    asyncio.run(outage())
    assert len(before.pending()) == 3
    sink = sinks(port=port)
    after = outbox_at(folder, sink.url)

    async def recovery() -> None:
        async with running(after):
            await until(lambda: not after.pending(), "the stored events delivered")

    asyncio.run(recovery())
    assert sink.delivered() == ids, "once each, oldest first, with the ids they were stored with"
