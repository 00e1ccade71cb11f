"""The watch's alarms: what a drift, outlier, accuracy or attribution alarm says, when one is due, and its way
into the outbox.

:class:`PendingAlarm` is an alarm on its way to the watch's outbox (its id fixed first, so a stored retry keeps
it); :func:`window_alarm` builds one from a window test's :class:`~kfloop.drift.detectors.WindowAlarm`
(``io.kfloop.drift.detected`` or ``io.kfloop.outlier.detected``), :func:`accuracy_alarm` one from the
policy's accuracy rule (``io.kfloop.accuracy.low``, judged once per fall by :class:`AccuracyRule`) and
:func:`attribution_alarm` one from attribution drift (``io.kfloop.attribution.drift``).
:class:`AlarmQueue` stores them in the outbox in the order they were raised and keeps those it could not
store. Used by :class:`kfloop.serving.watch.WatchService`; the fields are what the trigger service and the
demo read (docs/watch.md).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, Sequence

from prometheus_client import Counter, Gauge

from kfloop.drift.attribution import AttributionResult
from kfloop.drift.detectors import WindowAlarm
from kfloop.errors import TemporaryError
from kfloop.event_types import ACCURACY_EVENT, ATTRIBUTION_EVENT, DRIFT_EVENT, OUTLIER_EVENT
from kfloop.policies.spec import AccuracyPolicy
from kfloop.serving.outbox import Outbox

__all__ = ["AccuracyRule", "AlarmQueue", "FallRule", "PendingAlarm", "accuracy_alarm", "attribution_alarm", "iso_time", "window_alarm"]

SHOWN_P_VALUES = 20  # drifted features whose p-values an alarm lists
RECENT_ALARMS = 20  # stored alarms the queue remembers (the watch's /status lists them)

ALARMS = Counter("kfloop_watch_alarms", "Alarms raised, by kind.", ["model", "kind"])
UNSTORED = Gauge("kfloop_watch_alarms_unstored", "Alarms the outbox could not store yet (events are refused meanwhile).", ["model"])

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PendingAlarm:
    """An alarm on its way to the outbox (its id is fixed first, so a stored retry keeps it)."""

    id: str
    type: str
    source: str
    kind: str
    data: dict[str, Any]
    through: str | None  # the journaled id of the window's last row (marked once the alarm is stored)


def iso_time(epoch: float) -> str:
    """``epoch`` as UTC ISO 8601 with milliseconds."""
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds")


def window_alarm(alarm: WindowAlarm, *, model: str, version: str, source: str, backend: str, correction: str,
                 feature_names: Sequence[str], through: str | None) -> PendingAlarm:
    """The drift (or, without drift, outlier) alarm of one tested window."""
    result, first = alarm.result, alarm.first_drifted
    data = {
        "model": model,
        "version": version,
        "kind": alarm.kind,
        "backend": backend,
        "window": {"rows": result.rows, "first_row": alarm.row_numbers[0], "last_row": alarm.row_numbers[-1],
                   "first_time": iso_time(alarm.times[0]), "last_time": iso_time(alarm.times[-1])},
        "alpha": result.alpha,
        "correction": correction,
        "drift": result.drift,
        "drift_threshold": result.drift_threshold,
        "min_p_value": result.min_p_value,
        "drifted_features": len(result.drifted_features),
        "p_values": {feature_names[i]: float(result.p_values[i]) for i in result.drifted_features[:SHOWN_P_VALUES]},
        "outlier_alarm": result.outlier_alarm,
        "outliers": result.outliers,
        "outlier_threshold": result.outlier_threshold,
        "outlier_p_value": result.outlier_p_value,
        "first_drifted_row": alarm.row_numbers[first],
        "first_drifted_row_time": iso_time(alarm.times[first]),
    }
    event_type = DRIFT_EVENT if result.drift else OUTLIER_EVENT
    return PendingAlarm(str(uuid.uuid4()), event_type, f"{source}/{model}", alarm.kind, data, through)


def accuracy_alarm(*, model: str, version: str, source: str, figure: Mapping[str, float],
                   rule: AccuracyPolicy) -> PendingAlarm:
    """The alarm of the accuracy rule: ``version``'s realised accuracy ``figure`` fell below ``rule.below``."""
    data = {"model": model, "version": version, "kind": "accuracy", "accuracy": figure["accuracy"],
            "labels": int(figure["labels"]), "below": rule.below,
            "rule": f"accuracy below {rule.below:g} over the last {rule.labels} labelled answers",
            "judged_time": iso_time(time.time())}
    return PendingAlarm(str(uuid.uuid4()), ACCURACY_EVENT, f"{source}/{model}", "accuracy", data, None)


def attribution_alarm(result: AttributionResult, *, model: str, version: str, source: str) -> PendingAlarm:
    """The alarm of attribution drift: the window's feature ranking fell below the threshold (nDCG)."""
    data = {"model": model, "version": version, "kind": "attribution", "ndcg": result.ndcg, "threshold": result.threshold,
            "rows": result.rows, "judged_time": iso_time(time.time()),
            "moved": [{"feature": name, "baseline_share": before, "window_share": now} for name, before, now in result.moved]}
    return PendingAlarm(str(uuid.uuid4()), ATTRIBUTION_EVENT, f"{source}/{model}", "attribution", data, None)


class FallRule:
    """Due once when a version's figure falls, and again only after it is back (tests come on several threads)."""

    def __init__(self) -> None:
        self._fallen: set[str] = set()
        self._lock = threading.Lock()

    def fell(self, version: str, below: bool) -> bool:
        """Whether ``version``'s figure, now ``below`` its threshold or not, raises an alarm now."""
        with self._lock:
            if not below:
                self._fallen.discard(version)
                return False
            if version in self._fallen:
                return False
            self._fallen.add(version)
            return True


class AccuracyRule:
    """The policy's accuracy rule on realised accuracy: due once when a version's figure falls below ``below`` over
    at least ``labels`` labelled answers, and again only after it is back (a :class:`FallRule`)."""

    def __init__(self, rule: AccuracyPolicy) -> None:
        self.rule = rule
        self._falls = FallRule()

    def falls(self, version: str, figure: Mapping[str, float] | None) -> bool:
        """Whether ``figure`` (``accuracy`` over ``labels``) of ``version`` raises an alarm now."""
        rule = self.rule
        if rule.below is None or figure is None or figure["labels"] < rule.labels:
            return False
        return self._falls.fell(version, figure["accuracy"] < rule.below)


class AlarmQueue:
    """Alarms on their way into ``outbox``, stored oldest first; one the outbox cannot take stays first, and
    :meth:`check` refuses (503) until it is stored. ``on_stored`` runs for each once it is durable."""

    def __init__(self, outbox: Outbox, model: str, on_stored: Callable[[PendingAlarm], None]) -> None:
        self.outbox, self.model, self.on_stored = outbox, model, on_stored
        self.error: str | None = None  # why the first waiting alarm could not be stored (None: nothing failed)
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_ALARMS)  # stored alarms, oldest first
        self._lock = threading.Lock()  # the waiting alarms; held while storing them, in order
        self._waiting: list[PendingAlarm] = []
        self._queued = False

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, alarm: PendingAlarm) -> None:
        """Store ``alarm`` after every alarm waiting before it."""
        with self._lock:
            self._waiting.append(alarm)
        self.store()

    def claim_retry(self) -> bool:
        """Whether the caller should queue a :meth:`store` (alarms wait and no retry is queued yet)."""
        with self._lock:
            claim = bool(self._waiting) and not self._queued
            self._queued |= claim
            return claim

    def check(self, then: str) -> None:
        """A :class:`TemporaryError` while an alarm the outbox could not store waits (not while one is being stored)."""
        if self.error is not None and self._waiting:
            raise TemporaryError(f"alarm {self._waiting[0].id} of {self.model} could not be stored in the outbox "
                                 f"({self.error}); {then}")

    def store(self) -> None:
        """Put waiting alarms into the outbox, oldest first; stop at the first that fails (it stays first)."""
        with self._lock:
            self._queued = False
            while self._waiting:
                alarm = self._waiting[0]
                try:
                    self.outbox.put(alarm.type, alarm.source, alarm.data, event_id=alarm.id)
                except OSError as exc:
                    UNSTORED.labels(self.model).set(len(self._waiting))
                    error = f"{type(exc).__name__}: {exc}"
                    if error != self.error:
                        log.error("watch of %s: alarms failed: %s; trying again", self.model, error)
                    self.error = error  # from now on events are refused
                    return
                self._waiting.pop(0)
                ALARMS.labels(self.model, alarm.kind).inc()
                self.recent.append({"id": alarm.id, "type": alarm.type, **alarm.data})
                self.on_stored(alarm)
            UNSTORED.labels(self.model).set(0)
            if self.error is not None:
                log.warning("watch of %s: alarms working again", self.model)
                self.error = None

    def close(self) -> None:
        """A last :meth:`store` (on shutdown); what it cannot store is logged as lost."""
        self.store()
        if self._waiting:
            log.error("watch of %s: %d alarms could not be stored in the outbox and are lost on shutdown: %s",
                      self.model, len(self._waiting), ", ".join(alarm.id for alarm in self._waiting))
