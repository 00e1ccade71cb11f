"""The trigger service's HTTP app: alarm CloudEvents in, admission outcomes out.

``POST /`` takes CloudEvents (binary or structured) of the policy's
``retraining.events`` types for this model and hands each to
:class:`~kfloop.policies.retraining.RetrainingService`, which admits it (or
not) and runs the retraining and rollout. Replies never carry a CloudEvent:
202 with the admission outcome in ``x-kfloop-outcome``, 204 for events not
handled (``x-kfloop-ignored``), 400 for malformed events, 401/403 for a sender
without the right credentials (the local token; on a cluster the Knative
Trigger's OIDC token), 503 when the alarm could not be recorded (the state
file could not be written: nothing is remembered of it, so the sender's retry
is admitted). The 202 comes only once the alarm is on disk. An alarm can start
a retraining run, so the trigger never runs without an authenticator.
``GET /status`` lists pending and recent runs.
"""

from __future__ import annotations

from typing import Any


from kfloop.errors import InputError, KfloopError
from kfloop.policies.retraining import RetrainingService
from kfloop.serving.auth import Authenticator
from kfloop.serving.events import Delivery, EventApp, EventReply, create_event_app, json_object

__all__ = ["OUTCOME_HEADER", "TriggerApp", "create_app"]

OUTCOME_HEADER = "x-kfloop-outcome"


class TriggerApp:
    """Alarms -> admission: the :class:`~kfloop.serving.events.EventService` of the trigger."""

    def __init__(self, service: RetrainingService) -> None:
        self.service = service

    def handle(self, delivery: Delivery) -> EventReply:
        config, event = self.service.config, delivery.event
        if event["type"] not in config.policy.retraining.events:
            return EventReply.ignored(f"event type {event['type']!r} does not trigger retraining")
        model = json_object(event.get_data(), "an alarm's data").get("model")
        if not isinstance(model, str) or not model:
            raise InputError('an alarm\'s data must name its model: {"model": "<name>", ...}')
        if model != config.model:
            return EventReply.ignored(f"alarm is for model {model!r}, this service retrains {config.model!r}")
        return EventReply(202, {OUTCOME_HEADER: self.service.admit(str(event["id"]), event["type"])})

    def refused(self, error: KfloopError, event_type: str | None) -> None:
        pass  # a refused alarm is answered with its reason; admissions are counted by outcome

    def status(self) -> dict[str, Any]:
        return self.service.status()

    def health(self) -> dict[str, str]:
        return {"status": "ok"}


def create_app(service: RetrainingService, authenticator: Authenticator) -> EventApp:
    """``POST /`` alarms (only from senders ``authenticator`` admits), ``GET /status``, ``/healthz``, ``/metrics``;
    the worker runs while the app does."""

    async def start_worker() -> None:
        service.start()

    async def stop_worker() -> None:
        service.stop()

    # Admission writes (and fsyncs) the state file before it answers: off the event loop, in a worker thread.
    return create_event_app("kfloop trigger", TriggerApp(service), on_startup=start_worker, on_shutdown=stop_worker, offload=True,
                            authenticator=authenticator)
