"""The demo's client traffic: open-loop V2 requests at a set rate, every answer recorded, and the labels
that come for the answers.

:class:`Traffic` sends rows from a pool at a rate the scenario sets, from a
thread pool so that a slow answer never slows the schedule; each answer
becomes a :class:`RequestRecord`, and (when the scenario says so) the row's
true label goes to the watch's label door under the answer's ``x-request-id``
through a :class:`Labeller`. :func:`serve_rows` sends many rows in few
requests (a client's catalogue). :func:`shift` is the demo's covariate shift
(a recalibrated sensor); :func:`swapped_classes` its concept drift.
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
from kfloop.http_clients import http_client

__all__ = ["Labeller", "RequestRecord", "Traffic", "serve_rows", "shift", "swapped_classes"]

LABEL_RETRY_SECONDS = 5.0  # a label can come before the watch has the answer's event (404): sent again meanwhile
LABEL_RETRY_PAUSE = 0.1


@dataclass
class RequestRecord:
    time: float
    latency: float
    status: int
    version: str | None
    correct: bool | None
    phase: str




class Labeller:
    """The truth of answered rows, sent to the watch's label door (``POST /v2/models/{model}/labels``) with the
    home's token, as a labelling team would. A batch the watch refuses with 404 (an answer whose payload event
    has not reached it yet) is sent again for up to :data:`LABEL_RETRY_SECONDS`; the outcome of every batch is
    counted in :attr:`outcomes` (accepted, duplicate, refused labels)."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.url = url
        self._headers = headers
        self._client = http_client(timeout=30.0, max_connections=16)
        self._lock = threading.Lock()
        self.outcomes = {"accepted": 0, "duplicate": 0, "refused": 0}

    def send(self, items: list[dict[str, str]]) -> bool:
        """Send ``[{"id": ..., "label": ...}]``; whether the watch kept them."""
        deadline = time.monotonic() + LABEL_RETRY_SECONDS
        while True:
            try:
                answer = self._client.post(self.url, json=items, headers=self._headers)
                status = answer.status_code
            except httpx.HTTPError:
                status, answer = 599, None
            if status == 200 and answer is not None:
                taken = answer.json()
                with self._lock:
                    self.outcomes["accepted"] += int(taken["accepted"])
                    self.outcomes["duplicate"] += int(taken["duplicate"])
                return True
            if status not in (404, 503, 599) or time.monotonic() > deadline:
                with self._lock:
                    self.outcomes["refused"] += len(items)
                return False
            time.sleep(LABEL_RETRY_PAUSE)

    def close(self) -> None:
        self._client.close()


class Traffic:
    """Open-loop V2 requests at a set rate from a pool of rows; every answer is recorded, and its row's label
    sent to ``labeller`` while the scenario asks for labels."""

    def __init__(self, url: str, record: Callable[[RequestRecord], None], phase: Callable[[], str],
                 labeller: Labeller | None = None) -> None:
        self.url = url
        self._record = record
        self._phase = phase
        self._labeller = labeller
        self._send_labels = False
        self._client = http_client(timeout=30.0, max_connections=32)
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

    def set(self, rate: float, rows: np.ndarray | None = None, labels: np.ndarray | None = None, *,
            send_labels: bool | None = None) -> None:
        """Send ``rate`` requests/s; with ``rows`` and their true ``labels``, from that pool from now on; with
        ``send_labels``, whether each answered row's label goes to the labeller from now on."""
        if (rows is None) != (labels is None):
            raise InputError("give rows and labels together")
        if send_labels and self._labeller is None:
            raise InputError("labels need a labeller")
        with self._lock:
            self._rate = rate
            if send_labels is not None:
                self._send_labels = send_labels
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
                row, label, send_label = self._rows[index], str(self._labels[index]), self._send_labels
            self._pool.submit(self._send, row, label, send_label)

    def _send(self, row: np.ndarray, label: str, send_label: bool) -> None:
        phase = self._phase()
        body = _v2_body(row[None, :])
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
            if send_label and self._labeller is not None:
                self._labeller.send([{"id": answer.headers["x-request-id"], "label": label}])
        self._record(RequestRecord(sent, latency, status, version, correct, phase))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._pool.shutdown(wait=True)
        self._client.close()


def serve_rows(client: httpx.Client, url: str, rows: np.ndarray, rows_per_request: int,
               record: Callable[[RequestRecord], None], phase: str) -> list[str]:
    """Send ``rows`` as V2 requests of ``rows_per_request`` rows, one after another; returns each row's capture id
    (``<x-request-id>:<row>``, empty for a row whose request failed). Each request is recorded (``correct`` None:
    its rows are judged by their labels)."""
    ids: list[str] = []
    for start in range(0, len(rows), rows_per_request):
        part = rows[start:start + rows_per_request]
        body = _v2_body(part)
        sent = time.time()
        try:
            answer = client.post(url, json=body)
            status = answer.status_code
        except httpx.HTTPError:
            status, answer = 599, None
        ok = status == 200 and answer is not None
        request_id = answer.headers["x-request-id"] if ok and answer is not None else ""
        ids += [f"{request_id}:{row}" if ok else "" for row in range(len(part))]
        version = answer.json().get("model_version") if ok and answer is not None else None
        record(RequestRecord(sent, time.time() - sent, status, version, None, phase))
    return ids


def _v2_body(rows: np.ndarray) -> dict[str, object]:
    """A V2 inference request of ``rows`` (one FP64 tensor ``[n, features]``)."""
    return {"inputs": [{"name": "features", "datatype": "FP64", "shape": list(rows.shape), "data": rows.ravel().tolist()}]}


def swapped_classes(classes: list[str], share: float, seed: int) -> dict[str, str]:
    """Concept drift: ``share`` of the classes (rounded down to pairs) swap their labels in pairs; class -> its
    new label, for the swapped ones."""
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(sorted(classes))[: 2 * int(len(classes) * share / 2)].tolist()
    pairs = list(zip(chosen[0::2], chosen[1::2]))
    return {**{a: b for a, b in pairs}, **{b: a for a, b in pairs}}


def shift(features: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """A recalibrated sensor: every feature 30 % larger and offset by half its reference spread."""
    return features * 1.3 + 0.5 * reference.std(axis=0)
