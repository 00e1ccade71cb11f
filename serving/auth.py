"""Who may call a kfloop server: request authenticators and where the servers apply them.

An :class:`Authenticator` looks at a request's headers and either lets it
through or raises :class:`~kfloop.errors.Unauthenticated` (401: no or
unusable credentials) or :class:`~kfloop.errors.Forbidden` (403: checked,
not allowed). Two exist:

* :class:`LocalToken` -- one machine: the bearer token of ``KFLOOP_HOME``
  (:mod:`kfloop.credentials`), compared in constant time; on a server bound to
  loopback the ``Host`` header must name loopback too, so a web page that
  rebinds its own DNS name to 127.0.0.1 cannot reach the API through the
  browser;
* :class:`kfloop.serving.oidc.ServiceAccountTokens` -- a cluster: a Kubernetes
  ServiceAccount JWT checked against the cluster's OIDC keys.

:class:`RequireCredentials` applies one to chosen paths of an ASGI app (the
KServe servers' control and, when asked, inference routes);
:class:`GrpcCredentials` does the same for gRPC inference calls.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Any, Awaitable, Callable, Mapping, Protocol

import grpc
import orjson
from grpc_interceptor.server import AsyncServerInterceptor

from kfloop.errors import AccessError, Forbidden, InputError, Unauthenticated, to_http

__all__ = [
    "LOOPBACK_HOSTS",
    "Authenticator",
    "GrpcCredentials",
    "LocalToken",
    "RequireCredentials",
    "bearer_token",
    "inference_path",
    "is_loopback",
]

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
ASGIReceive = Callable[[], Awaitable[dict[str, Any]]]
ASGISend = Callable[[dict[str, Any]], Awaitable[None]]


class Authenticator(Protocol):
    """Checks one request by its (lower-case) headers; raises an :class:`~kfloop.errors.AccessError` to refuse it."""

    def check(self, headers: Mapping[str, str]) -> None: ...


def is_loopback(host: str) -> bool:
    """Whether ``host`` names loopback: ``localhost`` or a loopback IP address (``127.0.0.2`` yes, ``127.evil.example`` no)."""
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_name(host_header: str) -> str:
    """``Host`` without its port (``[::1]:8080`` -> ``[::1]``)."""
    if host_header.startswith("["):
        return host_header.split("]", 1)[0] + "]"
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def bearer_token(headers: Mapping[str, str]) -> str:
    """The token of ``Authorization: Bearer <token>``; :class:`Unauthenticated` if there is none."""
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if not value:
        raise Unauthenticated("this endpoint needs credentials: send Authorization: Bearer <token> (kfloop token prints it)")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("the Authorization header must be 'Bearer <token>'")
    return token.strip()


class LocalToken:
    """The local credential: ``Authorization: Bearer <the home's token>``; with ``loopback_only``, a loopback ``Host``."""

    def __init__(self, token: str, *, loopback_only: bool = True) -> None:
        if not token:
            raise InputError("the local token must not be empty")
        self._token = token.encode()
        self.loopback_only = loopback_only

    def check(self, headers: Mapping[str, str]) -> None:
        if self.loopback_only:
            if not is_loopback(_host_name(headers.get("host", ""))):
                raise Forbidden(f"Host {headers.get('host', '')!r} is not a loopback name; this server answers "
                                "control calls for localhost, 127.0.0.1 or [::1] only")
        if not hmac.compare_digest(bearer_token(headers).encode(), self._token):
            raise Forbidden("wrong token: use the one in KFLOOP_HOME/token (kfloop token prints it)")


def inference_path(path: str) -> bool:
    """Whether a REST path runs a model (V1 ``:predict``/``:explain``, V2 ``/infer``, versioned or not)."""
    return path.endswith((":predict", ":explain", "/infer", "/generate"))


class RequireCredentials:
    """ASGI middleware: requests whose path ``protects`` must pass ``authenticator``; others go straight through.

    A refusal is the protocol's error answer (``{"error": ...}`` with 401 or 403),
    sent before the body is read.
    """

    def __init__(self, app: Any, *, authenticator: Authenticator, protects: Callable[[str], bool]) -> None:
        self.app, self.authenticator, self.protects = app, authenticator, protects

    async def __call__(self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        if scope["type"] == "http" and self.protects(scope.get("path", "")):
            headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope.get("headers", ())}
            try:
                self.authenticator.check(headers)
            except AccessError as exc:
                answer = to_http(exc)
                body = orjson.dumps(answer.body)
                raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                raw += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers.items()]
                await send({"type": "http.response.start", "status": answer.status, "headers": raw})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


class GrpcCredentials(AsyncServerInterceptor):
    """gRPC: ``ModelInfer`` calls must carry ``authorization: Bearer <token>`` metadata that passes ``authenticator``.

    Give it an authenticator without a ``Host`` check (browsers do not speak gRPC). Install it inside an
    interceptor that maps :class:`~kfloop.errors.AccessError` to UNAUTHENTICATED / PERMISSION_DENIED.
    """

    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator

    async def intercept(self, method: Callable, request_or_iterator: Any, context: grpc.aio.ServicerContext,
                        method_name: str) -> Any:
        if method_name.endswith("/ModelInfer"):
            metadata = {key.lower(): value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)}
            self.authenticator.check(metadata)  # the server's error interceptor turns a refusal into its status
        return await method(request_or_iterator, context)
