"""kfloop's Prometheus metrics for its servers, next to KServe's own latency histograms.

``kfloop_requests_total{model, version, component, status_class}`` counts every
inference request by outcome (2xx / 4xx / 5xx) on REST and gRPC alike, so the
failure-rate policy can tell server failures (5xx) from client mistakes (4xx).
Requests for model names the server does not serve count as ``model="unknown"``.
:class:`RequestCounter` is a plain ASGI middleware (no per-request task or
body copy) and :class:`GrpcRequestCounter` its gRPC twin.
"""

from __future__ import annotations

import re
from typing import Any, Awaitable, Callable

import grpc
from grpc.aio import ServerInterceptor
from prometheus_client import Counter, Gauge

REQUESTS = Counter(
    "kfloop_requests",
    "Inference requests by model, model version, component and status class.",
    ["model", "version", "component", "status_class"],
)
PAYLOAD_EVENTS = Counter(
    "kfloop_payload_events",
    "Payload CloudEvents by outcome: sent, failed (sink error after retries), dropped (queue full) or error (could not be built).",
    ["model", "outcome"],
)
PAYLOAD_QUEUE = Gauge("kfloop_payload_queue_depth", "Payload CloudEvents waiting to be sent.", ["model"])
UPSTREAM_REQUESTS = Counter(
    "kfloop_upstream_requests",
    "Transformer -> predictor calls by predictor address and outcome (ok / error).",
    ["model", "upstream", "outcome"],
)
SHADOW_REQUESTS = Counter(
    "kfloop_shadow_requests",
    "Mirrored copies of requests sent to a shadow version, by outcome (ok / error / dropped: too many in flight); "
    "the answers are thrown away.",
    ["model", "version", "outcome"],
)

_MODEL_PATH = re.compile(r"^/v[12]/models/([^/:]+)(?:/versions/[^/]+)?(?::predict|/infer)$")
VersionOf = Callable[[str], "str | None"]  # the served version of a model name; None: not served here
UNKNOWN_MODEL = "unknown"  # the model label of requests for names this server does not serve


def _labels(model: str, version_of: VersionOf) -> tuple[str, str]:
    """(model, version) labels: a name that is not served is counted as ``unknown``, so that made-up
    names in URLs cannot make new series."""
    version = version_of(model)
    return (model, version) if version is not None else (UNKNOWN_MODEL, "")


def status_class(status: int) -> str:
    return f"{status // 100}xx"


class RequestCounter:
    """ASGI middleware counting inference requests (V1 ``:predict``, V2 ``/infer``) by status class."""

    def __init__(self, app: Any, component: str, version_of: VersionOf) -> None:
        self.app = app
        self.component = component
        self.version_of = version_of

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        match = _MODEL_PATH.match(scope.get("path", "")) if scope["type"] == "http" else None
        if match is None:
            await self.app(scope, receive, send)
            return
        model = match.group(1)
        status = 500

        async def capture(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            REQUESTS.labels(*_labels(model, self.version_of), self.component, status_class(status)).inc()


_GRPC_CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE}


class GrpcRequestCounter(ServerInterceptor):
    """Counts ``ModelInfer`` calls: OK as 2xx, argument/not-found errors as 4xx, the rest as 5xx."""

    def __init__(self, component: str, version_of: VersionOf) -> None:
        self.component = component
        self.version_of = version_of

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        handler = await continuation(details)
        if handler is None or not details.method.endswith("/ModelInfer") or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        component, version_of = self.component, self.version_of

        async def counted(request: Any, context: Any) -> Any:
            outcome = "5xx"
            try:
                response = await inner(request, context)
                code = context.code() if hasattr(context, "code") else None
                outcome = "2xx" if code in (None, grpc.StatusCode.OK) else _grpc_class(code)
                return response
            except Exception:
                code = context.code() if hasattr(context, "code") else None
                outcome = _grpc_class(code)
                raise
            finally:
                REQUESTS.labels(*_labels(request.model_name, version_of), component, outcome).inc()

        return grpc.unary_unary_rpc_method_handler(
            counted,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _grpc_class(code: Any) -> str:
    if code in (None, grpc.StatusCode.OK):
        return "5xx"  # an exception without a status set is a server error
    return "4xx" if code in _GRPC_CLIENT_ERRORS else "5xx"
