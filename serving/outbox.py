"""A durable outbox of CloudEvents: kept on disk until the sink has taken them.

Each event is one JSON file, written under a temporary name and renamed into
place, so a crash never leaves half an event; the sender posts the oldest
first as a binary-mode CloudEvent, deletes the file on a 2xx answer and
otherwise waits with exponential back-off (capped) before trying again. An
event keeps its id across retries and restarts, so a receiver that saw it
before can drop the duplicate.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent
from prometheus_client import Counter, Gauge

OUTBOX_SIZE = Gauge("kfloop_outbox_size", "Events waiting in the outbox for the sink.", ["outbox"])
OUTBOX_DELIVERIES = Counter("kfloop_outbox_deliveries", "Delivery attempts by outcome (sent / failed).", ["outbox", "outcome"])

log = logging.getLogger(__name__)


class Outbox:
    """Events for ``sink_url`` stored in ``folder``."""

    def __init__(self, folder: Path, sink_url: str, *, name: str = "alarms", backoff: tuple[float, ...] = (0.5, 1, 2, 5, 10, 30)) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.sink_url = sink_url
        self.name = name
        self.backoff = backoff
        self._wake = asyncio.Event()
        OUTBOX_SIZE.labels(name).set(len(self.pending()))

    def put(self, event_type: str, source: str, data: dict[str, Any], event_id: str | None = None) -> str:
        """Store one event; returns its id. Safe to call from any thread of the loop's process."""
        event_id = event_id or str(uuid.uuid4())
        record = {
            "id": event_id,
            "type": event_type,
            "source": source,
            "time": datetime.now(timezone.utc).isoformat(),
            "data": data,
        }
        stamp = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}"
        final = self.folder / f"{stamp}-{event_id}.json"
        tmp = final.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, default=_jsonable))
        os.replace(tmp, final)
        OUTBOX_SIZE.labels(self.name).set(len(self.pending()))
        self._wake.set()
        return event_id

    def pending(self) -> list[Path]:
        return sorted(self.folder.glob("*.json"))

    async def run(self) -> None:
        """Deliver forever (cancel the task to stop)."""
        failures = 0
        async with httpx.AsyncClient(timeout=10.0) as client:
            while True:
                files = self.pending()
                if not files:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                if await self._deliver(client, files[0]):
                    failures = 0
                    continue
                delay = self.backoff[min(failures, len(self.backoff) - 1)]
                failures += 1
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), delay)
                except asyncio.TimeoutError:
                    pass

    async def _deliver(self, client: httpx.AsyncClient, path: Path) -> bool:
        record = json.loads(path.read_text())
        attributes = {"id": record["id"], "type": record["type"], "source": record["source"], "time": record["time"],
                      "datacontenttype": "application/json"}
        headers, body = to_binary(CloudEvent(attributes, record["data"]))
        try:
            response = await client.post(self.sink_url, headers=headers, content=body)
            ok = response.status_code < 300
        except httpx.HTTPError as exc:
            log.warning("outbox %s: %s unreachable (%s); will retry", self.name, self.sink_url, exc)
            ok = False
        OUTBOX_DELIVERIES.labels(self.name, "sent" if ok else "failed").inc()
        if ok:
            path.unlink(missing_ok=True)
            OUTBOX_SIZE.labels(self.name).set(len(self.pending()))
        return ok


def _jsonable(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value.tolist() if hasattr(value, "tolist") else str(value)
