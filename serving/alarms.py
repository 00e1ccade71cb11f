"""The watch's alarms as CloudEvents: what a drift, outlier or accuracy alarm says, built before it is queued.

:class:`PendingAlarm` is an alarm on its way to the watch's outbox (its id fixed first, so a stored retry keeps
it); :func:`window_alarm` builds one from a window test's :class:`~kfloop.drift.detectors.WindowAlarm`
(``io.kfloop.drift.detected`` or ``io.kfloop.outlier.detected``) and :func:`accuracy_alarm` one from the
policy's accuracy rule (``io.kfloop.accuracy.low``). Used by :class:`kfloop.serving.watch.WatchService`, which
queues and stores them; the fields are what the trigger service and the demo read (docs/watch.md).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

from kfloop.drift.detectors import WindowAlarm
from kfloop.event_types import ACCURACY_EVENT, DRIFT_EVENT, OUTLIER_EVENT
from kfloop.policies.spec import AccuracyPolicy

__all__ = ["PendingAlarm", "accuracy_alarm", "iso_time", "window_alarm"]

SHOWN_P_VALUES = 20  # drifted features whose p-values an alarm lists


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
