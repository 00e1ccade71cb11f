"""The watch's process: its HTTP app, its background loops and its second port, served by uvicorn.

:func:`create_app` builds the payload port's app (``POST /`` events, ``POST /v2/models/{model}/labels``,
``GET /status``, ``/healthz``, ``/metrics``) around a :class:`~kfloop.serving.watch.WatchService` and starts its
loops (the outbox, following production, flushing buffers, timed window tests); :class:`Listener` serves one more
port on its own thread (the dead-letter port, :mod:`kfloop.serving.dead_letters`); :func:`run_watch` runs both
until SIGTERM or SIGINT. Called by ``kfloop watch`` (:mod:`kfloop.cli.watch`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Callable

from kfloop.errors import InputError
from kfloop.serving.auth import Authenticator
from kfloop.serving.events import EventApp, create_event_app
from kfloop.serving.dead_letters import DeadLetterPort, create_dead_letter_app
from kfloop.serving.limits import HeaderLimitedHttp
from kfloop.serving.watch import FLUSH_SECONDS, WatchConfig, WatchService

__all__ = ["Listener", "create_app", "run_watch"]

log = logging.getLogger(__name__)


class Listener:
    """One more port of the process, served by its own uvicorn server on its own thread and event loop.

    The socket is bound here, at construction, so a port in use stops the start
    rather than a thread; uvicorn leaves signals to the main thread's server,
    whose shutdown stops this one.
    """

    def __init__(self, app: EventApp, host: str, port: int) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, lifespan="off", log_level="warning",
                                                    access_log=False, http=HeaderLimitedHttp))
        self.socket = self.server.config.bind_socket()
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       name=f"kfloop-listener-{port}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout)
        self.socket.close()


def create_app(service: WatchService, authenticator: Authenticator | None, dead_letters: Listener | None = None) -> EventApp:
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
    import uvicorn

    if dead_letters is not None and dead_letters.port == port:
        raise InputError(f"the dead-letter port must differ from the payload port ({port}): "
                         "a NetworkPolicy tells the two senders apart by port")
    service = WatchService(config)
    listener = (Listener(create_dead_letter_app(service, dead_letters.authenticator), host, dead_letters.port)
                if dead_letters is not None else None)
    uvicorn.run(create_app(service, authenticator, listener), host=host, port=port, log_level="warning", access_log=False,
                http=HeaderLimitedHttp)
