"""HTTP clients: every httpx client kfloop makes comes from here, on one TLS context per process.

Loading the CA bundle into a TLS context is most of what a new httpx client costs; with the context
shared, a client per poller or per wait is cheap, and no caller needs to keep one alive for that reason.
:func:`http_client` and :func:`async_http_client` are used by the local runtime and its supervisor, the
stack's status, the rollout's deployers, the metric sources, the payload logger, the outbox and the demo.
A caller that must trust another CA (the cluster's OIDC issuer) passes its own ``verify``.
"""

from __future__ import annotations

import functools
import ssl
from typing import Any, Mapping

import httpx

__all__ = ["async_http_client", "http_client"]


@functools.cache
def _shared_tls() -> ssl.SSLContext:
    return httpx.create_ssl_context()


def _options(timeout: float, headers: Mapping[str, str] | None, max_connections: int | None,
             verify: ssl.SSLContext | bool | None) -> dict[str, Any]:
    options: dict[str, Any] = {"timeout": timeout, "verify": _shared_tls() if verify is None else verify}
    if headers:
        options["headers"] = dict(headers)
    if max_connections is not None:
        options["limits"] = httpx.Limits(max_connections=max_connections)
    return options


def http_client(*, timeout: float, headers: Mapping[str, str] | None = None, max_connections: int | None = None,
                verify: ssl.SSLContext | bool | None = None) -> httpx.Client:
    """A synchronous client with ``timeout`` seconds per request."""
    return httpx.Client(**_options(timeout, headers, max_connections, verify))


def async_http_client(*, timeout: float, headers: Mapping[str, str] | None = None, max_connections: int | None = None,
                      verify: ssl.SSLContext | bool | None = None) -> httpx.AsyncClient:
    """An asyncio client with ``timeout`` seconds per request."""
    return httpx.AsyncClient(**_options(timeout, headers, max_connections, verify))
