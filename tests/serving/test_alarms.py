"""The watch's alarm queue and accuracy rule directly (no watch process): alarms reach the outbox in the order
they were raised, one the outbox cannot store (a real full disk) stays first and makes events wait, and the
accuracy rule raises once per fall."""

from __future__ import annotations

import json

import pytest

from kfloop.errors import TemporaryError
from kfloop.event_types import ACCURACY_EVENT
from kfloop.policies.spec import AccuracyPolicy
from kfloop.serving.alarms import AccuracyRule, AlarmQueue, PendingAlarm, accuracy_alarm
from kfloop.serving.outbox import Outbox
from testbed import fill, small_disk


def alarm(number: int) -> PendingAlarm:
    return PendingAlarm(f"alarm-{number}", ACCURACY_EVENT, "kfloop/watch/leaf", "accuracy", {"number": number}, f"row-{number}")


def stored_ids(outbox: Outbox) -> list[str]:
    return [json.loads(path.read_text())["id"] for path in outbox.pending()]


def test_alarms_are_stored_in_the_order_raised_and_a_failed_one_stays_first_until_the_disk_has_room(tmp_path):
    with small_disk(tmp_path / "disk", size="1m") as disk:
        outbox = Outbox(disk / "outbox", "http://127.0.0.1:9/")  # never sent: only stored here
        marked: list[str | None] = []
        queue = AlarmQueue(outbox, "leaf", on_stored=lambda stored: marked.append(stored.through))
        queue.add(alarm(1))
        assert stored_ids(outbox) == ["alarm-1"] and len(queue) == 0 and queue.error is None
        queue.check("events are refused")  # nothing waits: no refusal
        filler = fill(disk)
        queue.add(alarm(2))
        queue.add(alarm(3))
        assert len(queue) == 2 and "No space left on device" in queue.error
        with pytest.raises(TemporaryError, match="alarm alarm-2 of leaf could not be stored in the outbox"):
            queue.check("events are refused until it is")
        assert queue.claim_retry() and not queue.claim_retry()  # one retry queued at a time
        filler.unlink()
        queue.store()
        assert stored_ids(outbox) == ["alarm-1", "alarm-2", "alarm-3"]
        assert marked == ["row-1", "row-2", "row-3"] and queue.error is None and not queue.claim_retry()
        assert [recent["id"] for recent in queue.recent] == ["alarm-1", "alarm-2", "alarm-3"]


def test_the_accuracy_rule_raises_once_per_fall_and_again_only_after_a_recovery():
    rule = AccuracyRule(AccuracyPolicy(below=0.8, labels=100))
    low, high, few = {"accuracy": 0.5, "labels": 150}, {"accuracy": 0.9, "labels": 150}, {"accuracy": 0.1, "labels": 99}
    assert [rule.falls("2", figure) for figure in (None, few, low, low, high, low)] == [False, False, True, False, False, True]
    assert rule.falls("3", low)  # each version falls on its own
    assert not AccuracyRule(AccuracyPolicy(below=None, labels=100)).falls("2", low)  # the rule is off


def test_an_accuracy_alarm_names_its_rule_and_figure():
    built = accuracy_alarm(model="leaf", version="2", source="kfloop/watch", figure={"accuracy": 0.5, "labels": 150},
                           rule=AccuracyPolicy(below=0.8, labels=100))
    assert (built.type, built.source, built.kind, built.through) == (ACCURACY_EVENT, "kfloop/watch/leaf", "accuracy", None)
    assert built.data["rule"] == "accuracy below 0.8 over the last 100 labelled answers"
    assert (built.data["accuracy"], built.data["labels"], built.data["version"]) == (0.5, 150, "2")
