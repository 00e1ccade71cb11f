"""Payload CloudEvents as KServe's logger sends them, emitted off the request path.

:class:`PayloadLogger` queues ``org.kubeflow.serving.inference.request`` / ``.response`` events
(binary mode, with KServe's extensions; :class:`EventContext` is what every event of one server
carries) and a background task posts them to the watch, retrying what may pass later, so logging
never slows or fails an inference. It stands in on one machine for KServe's logger sidecar:
``run_transformer`` (:mod:`kfloop.serving.entrypoints`) builds it when given a logger URL, and
the transformer (:mod:`kfloop.serving.transformer`) logs each request and answer through it.
Headers, retries and failure handling: ``docs/events.md``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import orjson

from kfloop.credentials import TokenFile
from kfloop.errors import InputError
from kfloop.http_clients import async_http_client
from kfloop.retry import Backoff, retryable_status
from kfloop.serving.metrics import PAYLOAD_EVENTS, PAYLOAD_QUEUE

__all__ = ["EventContext", "PayloadLogger"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EventContext:
    """What every event of one server carries."""

    source: str
    inference_service: str
    namespace: str = ""
    component: str = "transformer"
    endpoint: str = ""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


PAYLOAD_BACKOFF = Backoff((0.1, 0.2, 0.5, 1.0, 2.0, 5.0))  # one event's retries, within retry_seconds

class PayloadLogger:
    """Queue of payload events and the task that posts them to ``url``."""

    def __init__(self, url: str, context: EventContext, model: str, queue_size: int = 1000, timeout: float = 5.0, *,
                 token_file: Path | None = None, retry_seconds: float = 30.0,
                 backoff: Backoff = PAYLOAD_BACKOFF) -> None:
        self.url = url
        self.credentials = TokenFile(token_file) if token_file is not None else None  # the watch's local token
        self.context = context
        self.model = model
        self.queue_size = queue_size
        self.timeout = timeout
        self.retry_seconds = retry_seconds
        self.backoff = backoff  # one event's retries
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None

    def log(self, event_type: str, event_id: str, payload: Any, content_type: str, traceparent: str | None,
            *, client_id: str | None = None, version: str | None = None, shadow: bool = False) -> None:
        """Queue one event; never blocks, never raises. ``payload``: bytes, a JSON-able object, or has ``to_json()``;
        ``client_id``, the id the client gave its request, travels as the ``clientrequestid`` extension,
        ``version``, the model version that answered (a response), as ``modelversion``; ``shadow`` marks a
        shadow version's answer to a mirrored copy (``shadow: true``)."""
        if self._queue is None:
            self._queue = asyncio.Queue(maxsize=self.queue_size)
        if self._worker is None or self._worker.done():  # first use, or the task ended after all: start it (again)
            if self._worker is not None and not self._worker.cancelled() and self._worker.exception() is not None:
                log.error("payload events to %s: the sending task had stopped (%r); started again", self.url, self._worker.exception())
            self._worker = asyncio.get_running_loop().create_task(self._drain())
        try:
            self._queue.put_nowait((event_type, event_id, payload, content_type, traceparent, client_id, version, shadow, _now()))
        except asyncio.QueueFull:
            PAYLOAD_EVENTS.labels(self.model, "dropped").inc()
        PAYLOAD_QUEUE.labels(self.model).set(self._queue.qsize())

    def headers(self, event_type: str, event_id: str, content_type: str, traceparent: str | None, time: str,
                client_id: str | None = None, version: str | None = None, shadow: bool = False) -> dict[str, str]:
        headers = {
            "ce-specversion": "1.0",
            "ce-type": event_type,
            "ce-id": event_id,
            "ce-source": self.context.source,
            "ce-time": time,
            "ce-inferenceservicename": self.context.inference_service,
            "ce-namespace": self.context.namespace,
            "ce-component": self.context.component,
            "ce-endpoint": self.context.endpoint,
            "ce-recordedtime": _now(),
            "ce-metadata": "null",
            "content-type": content_type,
        }
        if traceparent:
            headers["ce-traceparent"] = traceparent
        if client_id:
            headers["ce-clientrequestid"] = _header_value(client_id)
        if version:
            headers["ce-modelversion"] = version
        if shadow:
            headers["ce-shadow"] = "true"
        return headers

    async def _drain(self) -> None:
        """Send queued events one after the other, forever: one event's failure never ends the loop."""
        assert self._queue is not None
        while True:
            try:
                async with async_http_client(timeout=self.timeout) as client:
                    while True:
                        item = await self._queue.get()
                        PAYLOAD_QUEUE.labels(self.model).set(self._queue.qsize())
                        try:
                            outcome = await self._send(client, *item)
                        except Exception:  # not CancelledError (a BaseException): cancelling still stops the task
                            log.exception("payload event %s to %s could not be sent; skipped", item[1], self.url)
                            outcome = "error"
                        PAYLOAD_EVENTS.labels(self.model, outcome).inc()
            except Exception:  # the client itself failed: a new one, after a breath
                log.exception("payload events to %s: the sending loop failed; carrying on", self.url)
                await asyncio.sleep(1.0)

    async def _send(self, client: httpx.AsyncClient, event_type: str, event_id: str, payload: Any, content_type: str,
                    traceparent: str | None, client_id: str | None, version: str | None, shadow: bool, time: str) -> str:
        """Post one event, retrying what may pass for up to ``retry_seconds``; returns the outcome to count."""
        body = _serialise(payload)
        headers = self.headers(event_type, event_id, content_type, traceparent, time, client_id, version, shadow)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry_seconds
        attempt = 0
        while True:
            try:
                if self.credentials is not None:
                    headers.update(self.credentials.headers())
                response = await client.post(self.url, content=body, headers=headers)
                if response.status_code < 300:
                    return "sent"
                problem = f"HTTP {response.status_code}"
                retry = retryable_status(response.status_code)
            except (httpx.TransportError, InputError) as exc:  # InputError: the token file cannot be read (yet)
                problem, retry = f"{type(exc).__name__}: {exc}", True
            except httpx.HTTPError as exc:
                problem, retry = f"{type(exc).__name__}: {exc}", False
            delay = self.backoff.delay(attempt + 1)
            if not retry or loop.time() + delay > deadline:
                log.warning("payload event %s to %s failed after %d attempts: %s", event_id, self.url, attempt + 1, problem)
                return "failed"
            await asyncio.sleep(delay)
            attempt += 1


def _header_value(text: str) -> str:
    """A client's id as a header value: printable ASCII, at most 256 characters."""
    return "".join(c if " " <= c <= "~" else "?" for c in text[:256])


def _serialise(payload: Any) -> bytes:
    if isinstance(payload, bytes):
        return payload
    if hasattr(payload, "to_json"):
        return payload.to_json()
    return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
