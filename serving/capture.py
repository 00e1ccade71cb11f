"""Captured payloads: the rows the model was asked about, kept for the next training.

Rows go to ``<registry>/<model>/captures/<YYYYMMDD>/<time>-<uuid>.csv`` as
shards the data loader reads (``id,<features>``; the id is the payload
event's ``ce-id`` and the row's position in it), each with a
``<shard>.meta.json`` beside it (model versions, capture times, rows). Add
the label column to a shard and it is training data. A shard is written
whole under a temporary name and renamed, so a reader never sees half of one.
"""

from __future__ import annotations

import csv
import io
import json
import time
import uuid
from datetime import datetime, timezone
from typing import Sequence

import fsspec
import numpy as np
from prometheus_client import Counter

from kfloop.registry import CAPTURES

CAPTURED_ROWS = Counter("kfloop_captured_rows", "Rows written to capture shards.", ["model"])


class PayloadCapture:
    """Buffers rows and writes a shard every ``flush_rows`` rows or ``flush_seconds`` seconds."""

    def __init__(self, registry_root: str, model: str, feature_names: Sequence[str], *, flush_rows: int = 500, flush_seconds: float = 30.0) -> None:
        self.root = f"{registry_root.rstrip('/')}/{model}/{CAPTURES}"
        self.model = model
        self.feature_names = list(feature_names)
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self._rows: list[tuple[str, str, str, np.ndarray]] = []
        self._last_flush = time.monotonic()

    def add(self, ids: Sequence[str], rows: np.ndarray, version: str) -> None:
        stamp = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        self._rows.extend((row_id, stamp, version, row) for row_id, row in zip(ids, rows))
        if len(self._rows) >= self.flush_rows or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> str | None:
        """Write buffered rows as one shard; returns its URI (None when empty)."""
        self._last_flush = time.monotonic()
        if not self._rows:
            return None
        rows, self._rows = self._rows, []
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["id", *self.feature_names])
        for row_id, _, _, values in rows:
            writer.writerow([row_id, *(repr(float(v)) for v in values)])
        meta = {
            "model": self.model,
            "model_versions": sorted({version for _, _, version, _ in rows}),
            "first_captured_at": rows[0][1],
            "last_captured_at": rows[-1][1],
            "rows": len(rows),
        }
        now = datetime.now(timezone.utc)
        name = f"{self.root}/{now:%Y%m%d}/{now:%H%M%S%f}-{uuid.uuid4().hex[:8]}.csv"
        fs, path = fsspec.core.url_to_fs(name)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path + ".meta.json", "w") as handle:
            json.dump(meta, handle)
        with fs.open(path + ".tmp", "w") as handle:
            handle.write(buffer.getvalue())
        fs.mv(path + ".tmp", path)
        CAPTURED_ROWS.labels(self.model).inc(len(rows))
        return name
