"""The watch's dead-letter port: alarms a Knative Trigger could not deliver, back into the outbox, and labels from
the Broker.

:class:`DeadLetters` is the port's event service: a dead-lettered alarm of this model is stored in the watch's
outbox again (same id, type, source, data) when Knative had retried it (:func:`knative_retries`, Knative's own
rule), a label event is taken as on the payload port. :func:`create_dead_letter_app` builds its app on
:mod:`kfloop.serving.events`; :class:`DeadLetterPort` says where it listens and who may send. Served beside the
payload port by :func:`kfloop.serving.watch_app.run_watch`. Dead letters on a cluster: docs/watch.md.
"""

from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter

from kfloop.errors import InputError, KfloopError, TemporaryError
from kfloop.event_types import ALARM_EVENTS, LABEL_EVENT
from kfloop.serving.auth import Authenticator
from kfloop.serving.events import Delivery, EventApp, EventReply, create_event_app, json_object
from kfloop.serving.watch import WatchService

__all__ = ["DEAD_LETTERS", "DeadLetterPort", "DeadLetters", "create_dead_letter_app", "knative_retries"]

log = logging.getLogger(__name__)


DEAD_LETTERS = Counter("kfloop_watch_dead_letters", "Alarms Knative dead-lettered back to the watch, by outcome "
                       "(requeued / dropped / ignored / invalid / failed).", ["model", "outcome"])


def knative_retries(status: int) -> bool:
    """Whether Knative's dispatcher retries a delivery that got ``status`` (``kncloudevents.SelectiveRetry``).

    No answer at all (``status <= 0``), 404, 408, 409, 429 and 5xx are retried
    with the Trigger's back-off; anything else goes to the dead-letter sink at once.
    """
    return status <= 0 or status >= 500 or status in (404, 408, 409, 429)


class DeadLetters:
    """The dead-letter port's service: this model's alarms that a Knative Trigger could not deliver, back into the outbox;
    and, on a cluster, labels (``io.kfloop.label``) that the labels Trigger delivers from the Broker.

    A dead letter carries Knative's ``knativeerrorcode`` (the trigger service's
    answer, or 500 when there was none) and ``knativeerrordata`` (its body,
    base64). It is stored again -- same id, type, source and data -- only when
    Knative had retried it: then each round through the Broker takes at least
    the Trigger's whole back-off, while one refused at once would come straight
    back.
    """

    def __init__(self, watch: WatchService) -> None:
        self.watch = watch

    def handle(self, delivery: Delivery) -> EventReply:
        """202 stored in the outbox, 204 not an alarm of this model or refused for good, 400 malformed, 503 not stored;
        a label event as on the payload port (:meth:`WatchService.label_event`)."""
        event, model = delivery.event, self.watch.config.model
        event_id, event_type = str(event["id"]), event["type"]
        if event_type == LABEL_EVENT:
            return self.watch.label_event(delivery)
        if event_type not in ALARM_EVENTS:
            return self._ignored("ignored", f"event type {event_type!r} is not an alarm ({', '.join(ALARM_EVENTS)}); "
                                            "only alarms and labels come here")
        data = json_object(event.get_data(), "a dead-lettered alarm's data")
        named = data.get("model")
        if not isinstance(named, str) or not named:
            raise InputError('an alarm\'s data must name its model: {"model": "<name>", ...}')
        if named != model:
            return self._ignored("ignored", f"alarm is for model {named!r}, this watch is {model!r}'s")
        status = _error_code(event)
        if status is not None and not knative_retries(status):
            log.error("alarm %s (%s) of %s was refused by %s with %d, which Knative does not retry: not sent again "
                      "(it would come straight back); the answer was: %s", event_id, event_type, model,
                      event.get("knativeerrordest", "the trigger service"), status, _error_data(event))
            return self._ignored("dropped", f"alarm {event_id} was refused with {status}, which Knative does not retry: "
                                            "not sent again")
        try:
            self.watch.outbox.put(event_type, event["source"], data, event_id=event_id)
        except OSError as exc:
            raise TemporaryError(f"dead-lettered alarm {event_id} of {model} could not be stored in the outbox "
                                 f"({type(exc).__name__}: {exc}); try again later") from None
        DEAD_LETTERS.labels(model, "requeued").inc()
        log.warning("alarm %s (%s) of %s came back undelivered (%s); stored in the outbox to be sent again",
                    event_id, event_type, model, "no answer" if status is None else f"last answer {status}")
        return EventReply(202)

    def _ignored(self, outcome: str, reason: str) -> EventReply:
        DEAD_LETTERS.labels(self.watch.config.model, outcome).inc()
        return EventReply.ignored(reason)

    def refused(self, error: KfloopError, event_type: str | None) -> None:
        if event_type == LABEL_EVENT:  # no dead letter: a label batch, counted as on the payload port
            self.watch.refused(error, event_type)
            return
        DEAD_LETTERS.labels(self.watch.config.model, "invalid" if error.status < 500 else "failed").inc()

    def status(self) -> dict[str, Any]:
        return {"model": self.watch.config.model, "outbox": len(self.watch.outbox.pending())}

    def health(self) -> dict[str, str]:
        return {"status": "ok"}


def _error_code(event: Any) -> int | None:
    """The status Knative recorded for the failed delivery (``knativeerrorcode``), if it is a number."""
    try:
        return int(str(event.get("knativeerrorcode", "")).strip())
    except ValueError:
        return None


def _error_data(event: Any) -> str:
    """The start of the refusal's body (``knativeerrordata``, base64), printable."""
    encoded = event.get("knativeerrordata")
    if not encoded:
        return "(none recorded)"
    try:
        text = base64.b64decode(encoded, validate=False).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        text = str(encoded)
    return text[:300].replace("\n", " ")


@dataclass(frozen=True)
class DeadLetterPort:
    """Where the watch takes back the alarms a Knative Trigger could not deliver, and from whom (None: anyone)."""

    port: int
    authenticator: Authenticator | None


def create_dead_letter_app(service: WatchService, authenticator: Authenticator | None) -> EventApp:
    """The dead-letter port's app: ``POST /`` dead letters (:class:`DeadLetters`), ``GET /healthz``, ``/status``, ``/metrics``.

    Storing into the outbox fsyncs, so events are handled on a worker thread.
    """
    return create_event_app("kfloop watch (dead letters)", DeadLetters(service), offload=True, authenticator=authenticator)
