"""The watch's process: its HTTP app, its background loops and its second port, served by uvicorn.

:func:`create_app` builds the payload port's app (``POST /`` events, ``POST /v2/models/{model}/labels``,
``GET /status``, ``/healthz``, ``/metrics``) around a :class:`~kfloop.serving.watch.WatchService` and starts its
loops (the outbox, following production, flushing buffers, timed window tests); the dead-letter port
(:mod:`kfloop.serving.dead_letters`) is served on its own thread (:class:`~kfloop.serving.listeners.ServerThread`);
:func:`run_watch` runs both until SIGTERM or SIGINT. Called by ``kfloop watch`` (:mod:`kfloop.cli.watch`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from kfloop.errors import InputError
from kfloop.serving.auth import Authenticator
from kfloop.serving.events import EventApp, create_event_app
from kfloop.serving.dead_letters import DeadLetterPort, create_dead_letter_app
from kfloop.serving.listeners import ServerThread, listening, serve
from kfloop.serving.watch import FLUSH_SECONDS, WatchConfig, WatchService

__all__ = ["create_app", "run_watch"]

log = logging.getLogger(__name__)


def create_app(service: WatchService, authenticator: Authenticator | None, dead_letters: ServerThread | None = None) -> EventApp:
    """The service's HTTP app: ``POST /`` events, ``POST /v2/models/{model}/labels`` labels
(:mod:`kfloop.serving.feedback`; the events' credentials), ``GET /status``, ``GET /healthz``, ``GET /metrics``.

    An event is parsed and added to the window on the event loop (a fraction of
    a millisecond); the window tests, file writes and alarms run on the
    service's worker thread, so ``/healthz`` answers while the service is saturated.
    ``dead_letters``, when given, is served while the app is (started with it, stopped first).
    """
    background: list[asyncio.Task] = []
    model = service.config.model

    async def start_tasks() -> None:
        if dead_letters is not None:
            dead_letters.start()
        background.append(asyncio.create_task(service.outbox.run()))
        background.append(asyncio.create_task(_every(service.config.follow_seconds, service.follow_production,
                                                     f"following the production version of {model}")))
        background.append(asyncio.create_task(_every(FLUSH_SECONDS, service.flush, f"writing the buffers of {model}")))
        if service.config.stride_seconds > 0:  # rows that came faster than one test per stride_seconds
            background.append(asyncio.create_task(_every(service.config.stride_seconds, service.test_due,
                                                         f"testing the window of {model}")))

    async def stop_tasks() -> None:
        if dead_letters is not None:  # first: nothing comes into the outbox once the watch is closing
            await asyncio.get_running_loop().run_in_executor(None, dead_letters.stop)
        for task in background:
            task.cancel()
        await asyncio.get_running_loop().run_in_executor(None, service.close)

    def post_labels(body: Any) -> dict[str, Any]:
        intake = service.take_labels(body)
        return {"accepted": intake.accepted, "duplicate": intake.duplicate}

    return create_event_app("kfloop watch", service, on_startup=start_tasks, on_shutdown=stop_tasks, authenticator=authenticator,
                            json_posts={f"/v2/models/{model}/labels": post_labels})


async def _every(seconds: float, work: Callable[[], object], what: str) -> None:
    """Run ``work`` in a worker thread every ``seconds``; a failure is logged and the next round comes."""
    while True:
        await asyncio.sleep(seconds)
        try:
            await asyncio.get_running_loop().run_in_executor(None, work)
        except Exception:  # a registry hiccup or a failed test must not stop the watch
            log.exception("%s failed; trying again in %.1f s", what, seconds)


def run_watch(config: WatchConfig, authenticator: Authenticator | None, host: str = "127.0.0.1", port: int = 8085,
              dead_letters: DeadLetterPort | None = None) -> None:
    """Serve the watch service until SIGTERM/SIGINT; payload events must pass ``authenticator`` (None: open).

    With ``dead_letters`` the watch also takes back, on that port, the alarms a Knative Trigger could not deliver.
    """
    if dead_letters is not None and dead_letters.port == port:
        raise InputError(f"the dead-letter port must differ from the payload port ({port}): "
                         "a NetworkPolicy tells the two senders apart by port")
    payload_socket = listening(host, port, "payload events")  # both ports before the service starts its work
    dead_letter_socket = listening(host, dead_letters.port, "dead letters") if dead_letters is not None else None
    service = WatchService(config)
    dead_letter_server = None
    if dead_letters is not None and dead_letter_socket is not None:  # (the second test is for the type checker)
        dead_letter_server = ServerThread(create_dead_letter_app(service, dead_letters.authenticator), dead_letter_socket,
                                          name=f"kfloop-dead-letters-{dead_letters.port}")
    serve(create_app(service, authenticator, dead_letter_server), payload_socket)
