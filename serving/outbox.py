"""A durable outbox of CloudEvents: kept on disk until the sink has taken them.

:class:`Outbox` owns one folder and everything in it: :meth:`Outbox.put` stores an event there
durably (from any thread of the process), and :meth:`Outbox.run`, a task that runs until cancelled,
posts the stored events to the sink as binary-mode CloudEvents, oldest first, each with its own
retry schedule. Events the sink refuses for good (not :func:`~kfloop.retry.retryable_status`) move to
``dead-letter/``, files that are not an event to ``quarantine/``. Used by the watch: its
``WatchService`` keeps its alarms in one, ``DeadLetters`` (:mod:`kfloop.serving.dead_letters`)
stores there the alarms Knative dead-lettered back, and its app runs the delivery loop.
Folder layout, retries and metrics: ``docs/events.md``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
from cloudevents.conversion import to_binary
from cloudevents.exceptions import GenericException
from cloudevents.http import CloudEvent
from prometheus_client import Counter, Gauge

from kfloop.credentials import TokenFile
from kfloop.durable import atomic_write, fsync_folder
from kfloop.errors import InputError, UpstreamError, is_temporary
from kfloop.http_clients import async_http_client
from kfloop.retry import Backoff, retryable_status, wait_before_retry

__all__ = [
    "DEAD_LETTER",
    "OUTBOX_DEAD_LETTERED",
    "OUTBOX_DELIVERIES",
    "OUTBOX_QUARANTINED",
    "OUTBOX_SIZE",
    "QUARANTINE",
    "Outbox",
    "ALARM_BACKOFF",
]

OUTBOX_SIZE = Gauge("kfloop_outbox_size", "Events waiting in the outbox for the sink.", ["outbox"])
OUTBOX_DELIVERIES = Counter(
    "kfloop_outbox_deliveries",
    "Delivery attempts by outcome (sent / failed / dead_lettered / quarantined).",
    ["outbox", "outcome"],
)
OUTBOX_DEAD_LETTERED = Gauge("kfloop_outbox_dead_lettered", "Events the sink refused for good, kept in dead-letter/.", ["outbox"])
OUTBOX_QUARANTINED = Gauge("kfloop_outbox_quarantined", "Unreadable event files, kept in quarantine/.", ["outbox"])

DEAD_LETTER = "dead-letter"
QUARANTINE = "quarantine"
REASON_SUFFIX = ".reason.json"
BODY_EXCERPT = 1000  # characters of a refusal's body kept in its reason file
REQUIRED_KEYS = ("id", "type", "source", "time")

log = logging.getLogger(__name__)


ALARM_BACKOFF = Backoff((0.5, 1, 2, 4, 8, 16, 30), jitter=0.5)  # one event's retries


class _Corrupt(Exception):
    """An event file that cannot be an event (not JSON, a key missing or of the wrong type)."""


@dataclass
class _Retry:
    """One event's retry state: failed attempts so far and when (``time.monotonic``) to try again."""

    attempts: int = 0
    due: float = 0.0


class Outbox:
    """Events for ``sink_url`` stored in ``folder``.

    ``backoff`` is the retry schedule of one event (a sink's ``Retry-After`` is
    honoured up to its cap). ``timeout`` bounds one POST; ``error_pause`` is how long the
    supervised loop rests after an unexpected error; ``rescan`` is the longest
    the loop sleeps without looking at the folder (for files put there by
    another process).
    """

    def __init__(
        self,
        folder: Path,
        sink_url: str,
        *,
        name: str = "alarms",
        backoff: Backoff = ALARM_BACKOFF,
        timeout: float = 10.0,
        error_pause: float = 1.0,
        rescan: float = 30.0,
        credentials: TokenFile | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.dead_letter_folder = self.folder / DEAD_LETTER
        self.quarantine_folder = self.folder / QUARANTINE
        self.sink_url = sink_url
        self.credentials = credentials  # the bearer token every POST carries (re-read when its file changes)
        self.name = name
        self.backoff = backoff
        self.timeout = timeout
        self.error_pause = error_pause
        self.rescan = rescan
        self._retries: dict[str, _Retry] = {}
        self._stamp_lock = threading.Lock()
        self._last_stamp = datetime.min.replace(tzinfo=timezone.utc)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._remove_stale_temporaries()
        self._count()

    # --- storing -----------------------------------------------------------------------------

    def put(self, event_type: str, source: str, data: dict[str, Any], event_id: str | None = None) -> str:
        """Store one event durably; returns its id. Safe to call from any thread of the process."""
        event_id = event_id or str(uuid.uuid4())
        now = self._next_stamp()
        record = {"id": event_id, "type": event_type, "source": source, "time": now.isoformat(), "data": data}
        safe_id = re.sub(r"[^A-Za-z0-9._-]", "_", event_id)[:120]
        final = self.folder / f"{now:%Y%m%dT%H%M%S%f}-{safe_id}.json"
        atomic_write(final, json.dumps(record, default=_jsonable))
        OUTBOX_SIZE.labels(self.name).set(len(self.pending()))
        self._notify()
        return event_id

    def pending(self) -> list[Path]:
        """Event files waiting for the sink, oldest first."""
        return sorted(path for path in self.folder.glob("*.json") if path.is_file())

    def dead_lettered(self) -> list[Path]:
        """Event files the sink refused for good (each has a ``<name>.reason.json`` beside it)."""
        return _event_files(self.dead_letter_folder)

    def quarantined(self) -> list[Path]:
        """Files that were not a readable event (each has a ``<name>.reason.json`` beside it)."""
        return _event_files(self.quarantine_folder)

    # --- delivering --------------------------------------------------------------------------

    async def run(self) -> None:
        """Deliver forever (cancel the task to stop); never stops on an error."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        try:
            async with async_http_client(timeout=self.timeout) as client:
                while True:
                    try:
                        delay = await self._deliver_due(client)
                    except Exception:  # not CancelledError, a BaseException: cancelling still stops the loop
                        log.exception("outbox %s: delivery pass failed; carrying on in %.1f s", self.name, self.error_pause)
                        delay = self.error_pause
                    await self._sleep(delay)
        finally:
            self._loop = None
            self._wake = None

    async def _deliver_due(self, client: httpx.AsyncClient) -> float:
        """Try every due event once, oldest first; returns how long to sleep until the next is due."""
        assert self._wake is not None
        self._wake.clear()  # a put() from here on wakes the next sleep
        files = self.pending()
        names = {path.name for path in files}
        for gone in set(self._retries) - names:
            del self._retries[gone]
        for path in files:
            retry = self._retries.get(path.name)
            if retry is not None and retry.due > time.monotonic():
                continue
            try:
                await self._deliver(client, path)
            except Exception:  # one event's trouble (say, a full disk) must not hold back the others
                log.exception("outbox %s: could not handle %s; will retry it", self.name, path.name)
                OUTBOX_DELIVERIES.labels(self.name, "failed").inc()
                self._postpone(path.name)
        now = time.monotonic()
        waits = [retry.due - now for retry in self._retries.values()]
        return max(0.0, min(waits)) if waits else self.rescan

    async def _deliver(self, client: httpx.AsyncClient, path: Path) -> None:
        try:
            headers, body = _binary_event(path)
        except FileNotFoundError:
            self._retries.pop(path.name, None)  # taken away meanwhile
            return
        except _Corrupt as exc:
            self._quarantine(path, str(exc))
            return
        try:
            if self.credentials is not None:
                headers.update(self.credentials.headers())
            response = await client.post(self.sink_url, headers=headers, content=body)
        except Exception as exc:
            if not (isinstance(exc, (httpx.TransportError, InputError)) or is_temporary(exc)):  # InputError: no token file
                log.exception("outbox %s: unexpected error posting %s", self.name, path.name)
            self._failed(path.name, f"{self.sink_url} unreachable ({type(exc).__name__}: {exc})")
            return
        status = response.status_code
        if 200 <= status < 300:
            self._sent(path)
        elif not retryable_status(status):
            self._dead_letter(path, status, response.text)
        else:
            reason = f"{self.sink_url} answered {status}"
            self._failed(path.name, reason, UpstreamError(reason, delay=_retry_after(response)))

    def _sent(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        fsync_folder(self.folder)
        self._retries.pop(path.name, None)
        OUTBOX_DELIVERIES.labels(self.name, "sent").inc()
        OUTBOX_SIZE.labels(self.name).set(len(self.pending()))

    def _failed(self, name: str, reason: str, error: UpstreamError | None = None) -> None:
        OUTBOX_DELIVERIES.labels(self.name, "failed").inc()
        retry = self._postpone(name, error)
        level = logging.WARNING if retry.attempts == 1 or retry.attempts % 10 == 0 else logging.DEBUG
        log.log(level, "outbox %s: %s for %s (attempt %d); retrying in %.2f s",
                self.name, reason, name, retry.attempts, retry.due - time.monotonic())

    def _postpone(self, name: str, error: UpstreamError | None = None) -> _Retry:
        retry = self._retries.setdefault(name, _Retry())
        retry.attempts += 1
        retry.due = time.monotonic() + wait_before_retry(self.backoff, retry.attempts, error)
        return retry

    def _dead_letter(self, path: Path, status: int, body: str) -> None:
        reason = {"status": status, "body": body[:BODY_EXCERPT], "sink": self.sink_url,
                  "attempts": self._retries.get(path.name, _Retry()).attempts + 1}
        self._move(path, self.dead_letter_folder, reason)
        OUTBOX_DELIVERIES.labels(self.name, "dead_lettered").inc()
        log.warning("outbox %s: %s refused %s with %d (%s); moved to %s", self.name, self.sink_url, path.name,
                    status, body[:200].strip() or "no body", self.dead_letter_folder)

    def _quarantine(self, path: Path, problem: str) -> None:
        self._move(path, self.quarantine_folder, {"problem": problem})
        OUTBOX_DELIVERIES.labels(self.name, "quarantined").inc()
        log.warning("outbox %s: %s is not an event (%s); moved to %s", self.name, path.name, problem, self.quarantine_folder)

    def _move(self, path: Path, folder: Path, reason: dict[str, Any]) -> None:
        """Move ``path`` into ``folder`` with a reason file beside it, durably.

        The reason is written first: a crash in between leaves the event pending (and its next move rewrites the reason).
        """
        folder.mkdir(exist_ok=True)
        reason = {"file": path.name, "at": datetime.now(timezone.utc).isoformat(), **reason}
        atomic_write(folder / (path.stem + REASON_SUFFIX), json.dumps(reason, indent=2))
        os.replace(path, folder / path.name)
        fsync_folder(folder)
        fsync_folder(self.folder)
        self._retries.pop(path.name, None)
        self._count()

    async def _sleep(self, seconds: float) -> None:
        assert self._wake is not None
        if seconds <= 0:
            await asyncio.sleep(0)  # let others run between passes
            return
        try:
            await asyncio.wait_for(self._wake.wait(), min(seconds, self.rescan))
        except TimeoutError:
            pass

    # --- helpers -----------------------------------------------------------------------------

    def _notify(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is None or wake is None:
            return  # run() is not running: it lists the folder when it starts
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            wake.set()
        else:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # the loop closed meanwhile
                pass

    def _next_stamp(self) -> datetime:
        """Now, but always later than the last stamp of this outbox (so names keep the order of put())."""
        with self._stamp_lock:
            now = datetime.now(timezone.utc)
            if now <= self._last_stamp:
                now = self._last_stamp + timedelta(microseconds=1)
            self._last_stamp = now
            return now

    def _remove_stale_temporaries(self) -> None:
        """Drop half-written files a crash left (their put() never returned, so nobody holds their id).

        Only files older than a minute: a younger one may be another writer's put() in progress.
        """
        cutoff = time.time() - 60
        for stale in [*self.folder.glob(".*.json.tmp-*"), *self.folder.glob("*.tmp")]:
            try:
                if stale.stat().st_mtime < cutoff:
                    stale.unlink()
            except FileNotFoundError:
                pass

    def _count(self) -> None:
        OUTBOX_SIZE.labels(self.name).set(len(self.pending()))
        OUTBOX_DEAD_LETTERED.labels(self.name).set(len(self.dead_lettered()))
        OUTBOX_QUARANTINED.labels(self.name).set(len(self.quarantined()))


def _binary_event(path: Path) -> tuple[dict[str, str], bytes]:
    """The stored event as binary-mode CloudEvent headers and body; :class:`_Corrupt` when it is not one."""
    raw = path.read_bytes()
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Corrupt(f"not JSON: {exc}") from None
    if not isinstance(record, dict):
        raise _Corrupt(f"not a JSON object but {type(record).__name__}")
    missing = [key for key in (*REQUIRED_KEYS, "data") if key not in record]
    if missing:
        raise _Corrupt(f"missing {', '.join(missing)}")
    wrong = [key for key in REQUIRED_KEYS if not isinstance(record[key], str) or not record[key]]
    if wrong:
        raise _Corrupt(f"{', '.join(wrong)} must be non-empty strings")
    attributes = {key: record[key] for key in REQUIRED_KEYS}
    try:
        return to_binary(CloudEvent({**attributes, "datacontenttype": "application/json"}, record["data"]))
    except (GenericException, ValueError, TypeError) as exc:
        raise _Corrupt(f"not a CloudEvent: {exc}") from None


def _event_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.glob("*.json") if path.is_file() and not path.name.endswith(REASON_SUFFIX))


def _retry_after(response: httpx.Response) -> float | None:
    """A ``Retry-After`` given in seconds, if the answer has one."""
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return None


def _jsonable(value: Any) -> Any:
    """NumPy scalars and arrays as plain numbers and lists (``tolist`` first: an array has ``item`` too); else text."""
    return value.tolist() if hasattr(value, "tolist") else value.item() if hasattr(value, "item") else str(value)
