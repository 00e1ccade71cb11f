"""The demo's client traffic: open-loop V2 requests at a set rate, every answer recorded.

:class:`Traffic` sends rows from a pool at a rate the scenario sets, from a
thread pool so that a slow answer never slows the schedule; each answer
becomes a :class:`RequestRecord`. :func:`shift` is the demo's covariate
shift (a recalibrated sensor).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import httpx
import numpy as np

from kfloop.errors import InputError

__all__ = ["RequestRecord", "Traffic", "shift"]


@dataclass
class RequestRecord:
    time: float
    latency: float
    status: int
    version: str | None
    correct: bool | None
    phase: str




class Traffic:
    """Open-loop V2 requests at a set rate from a pool of rows; every answer is recorded."""

    def __init__(self, url: str, record: Callable[[RequestRecord], None], phase: Callable[[], str]) -> None:
        self.url = url
        self._record = record
        self._phase = phase
        self._client = httpx.Client(timeout=30.0, limits=httpx.Limits(max_connections=32))
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="kfloop-demo-traffic")
        self._lock = threading.Lock()
        self._rate = 0.0
        self._rows = np.empty((0, 0))
        self._labels = np.empty(0, dtype=str)
        self._next_row = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kfloop-demo-traffic", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def set(self, rate: float, rows: np.ndarray | None = None, labels: np.ndarray | None = None) -> None:
        """Send ``rate`` requests/s; with ``rows`` and their ``labels``, from that pool from now on."""
        if (rows is None) != (labels is None):
            raise InputError("give rows and labels together")
        with self._lock:
            self._rate = rate
            if rows is not None:
                self._rows, self._labels, self._next_row = rows, labels, 0

    def _run(self) -> None:
        due = time.monotonic()
        while not self._stop.is_set():
            with self._lock:
                rate, rows = self._rate, len(self._rows)
            if rate <= 0 or rows == 0:
                due = time.monotonic() + 0.1
                self._stop.wait(0.1)
                continue
            due = max(due + 1.0 / rate, time.monotonic() - 1.0)  # catch up at most a second after a stall
            self._stop.wait(max(0.0, due - time.monotonic()))
            with self._lock:
                index = self._next_row % len(self._rows)
                self._next_row += 1
                row, label = self._rows[index], str(self._labels[index])
            self._pool.submit(self._send, row, label)

    def _send(self, row: np.ndarray, label: str) -> None:
        phase = self._phase()
        body = {"inputs": [{"name": "features", "datatype": "FP64", "shape": [1, len(row)], "data": row.tolist()}]}
        sent = time.time()
        try:
            answer = self._client.post(self.url, json=body)
            status = answer.status_code
        except httpx.HTTPError:
            status, answer = 599, None
        latency = time.time() - sent
        version = correct = None
        if status == 200 and answer is not None:
            document = answer.json()
            version = document.get("model_version")
            outputs = {o["name"]: o["data"] for o in document.get("outputs", [])}
            correct = bool(outputs.get("label") and outputs["label"][0] == label)
        self._record(RequestRecord(sent, latency, status, version, correct, phase))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._pool.shutdown(wait=True)
        self._client.close()


def shift(features: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """A recalibrated sensor: every feature 30 % larger and offset by half its reference spread."""
    return features * 1.3 + 0.5 * reference.std(axis=0)
