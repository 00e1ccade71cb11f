"""kfloop's one error hierarchy, and the one place an error becomes an HTTP answer.

Every error kfloop raises on purpose derives from :class:`KfloopError`, which is never raised itself: the
class decides what happens next -- fix the input (:class:`InputError`), present credentials
(:class:`AccessError`), ask for what exists (:class:`NotFoundError`), re-read the state (:class:`ConflictError`),
retry (:class:`TemporaryError`) or give up (:class:`PermanentError`). Each class also inherits the built-in
exception callers already catch (``ValueError``, ``PermissionError``, ``LookupError``, ``ConnectionError``,
``RuntimeError``), and its message carries the context a user needs (file, row, column, field).
Every module raises them; :func:`to_http` is how every kfloop server turns one into an answer, :func:`is_temporary`
tells retry loops whether to retry, and the CLI prints the message and exits 1 (:mod:`kfloop.cli`).
The table of classes, HTTP statuses and what the caller does: docs/architecture.md#errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

__all__ = [
    "MODEL_VERSION_HEADER",
    "AccessError",
    "ClusterError",
    "ConflictError",
    "DataError",
    "Forbidden",
    "HttpAnswer",
    "InjectedFailure",
    "InputError",
    "KfloopError",
    "ManifestError",
    "NotFoundError",
    "PayloadTooLarge",
    "PermanentError",
    "PipelineError",
    "PolicyError",
    "RegistryError",
    "StorageError",
    "StorageUnavailable",
    "TemporaryError",
    "Unauthenticated",
    "UnsupportedMediaType",
    "UpstreamError",
    "VersionMismatch",
    "describe_validation_errors",
    "is_temporary",
    "to_http",
]

MODEL_VERSION_HEADER = "x-kfloop-model-version"  # the version a predictor serves, on a VersionMismatch answer


class KfloopError(Exception):
    """Root of all kfloop errors; ``status`` is the HTTP status it maps to. Raise a subclass."""

    status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers the answer carries besides the ``{"error": ...}`` body."""
        return {}


# --- the caller's input is wrong: 4xx, never retried ----------------------------------------------


class InputError(KfloopError, ValueError):
    """A request or input cannot be used: says what was wrong and what is expected."""

    status = 400


class DataError(InputError):
    """Input data cannot be used: names the file, and where known the row and column."""

    def __init__(
        self,
        reason: str,
        *,
        source: str | None = None,
        row: int | None = None,
        column: str | None = None,
    ) -> None:
        where = [part for part in (
            f"{source}" if source else None,
            f"row {row}" if row is not None else None,
            f"column {column!r}" if column is not None else None,
        ) if part]
        super().__init__(f"{', '.join(where)}: {reason}" if where else reason)
        self.reason = reason
        self.source = source
        self.row = row
        self.column = column


class PayloadTooLarge(InputError):
    """A request body is over the server's size limit (refused before it is read whole)."""

    status = 413


class UnsupportedMediaType(InputError):
    """A JSON API was sent another content type (which also closes the cross-site form-post path)."""

    status = 415


class PolicyError(InputError):
    """The policy file or a policy setting is invalid; the message lists every bad field with what is allowed."""


class ManifestError(InputError):
    """Cluster objects cannot be rendered or do not match their upstream schema (image, names, CRDs)."""


# --- the caller is not (known to be) allowed: 401 / 403, never retried as is ------------------------


class AccessError(KfloopError, PermissionError):
    """The request lacks the credentials this action needs."""

    status = 403


class Unauthenticated(AccessError):
    """No credentials, or ones that cannot be checked (malformed, expired, wrong signature or audience)."""

    status = 401

    @property
    def headers(self) -> dict[str, str]:
        return {"www-authenticate": 'Bearer realm="kfloop"'}


class Forbidden(AccessError):
    """Credentials that were checked and are not allowed this action (a wrong token, another subject or host)."""


class NotFoundError(KfloopError, LookupError):
    """What was asked for does not exist."""

    status = 404


class RegistryError(NotFoundError):
    """A model or version is missing from the registry."""


class ConflictError(KfloopError, LookupError):
    """The request does not fit the current state; re-read it and ask again."""

    status = 409


class VersionMismatch(ConflictError):
    """A predictor got features scaled for other model versions than the one it serves.

    The answer names the served version (:data:`MODEL_VERSION_HEADER`), so that
    the caller can scale the rows for it and ask again.
    """

    def __init__(self, message: str, *, served_version: str) -> None:
        super().__init__(message)
        self.served_version = served_version

    @property
    def headers(self) -> dict[str, str]:
        return {MODEL_VERSION_HEADER: self.served_version}


# --- something else failed: temporary (retry) or permanent (give up) -------------------------------


class TemporaryError(KfloopError, ConnectionError):
    """A failure that may pass: retry with back-off -- waiting ``delay`` seconds at least when the raiser knows
    how long (a sink's ``Retry-After``); an HTTP answer says so in its own ``Retry-After``."""

    status = 503

    def __init__(self, message: str, *, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay

    @property
    def headers(self) -> dict[str, str]:
        return {} if self.delay is None else {"retry-after": str(max(1, math.ceil(self.delay)))}


class UpstreamError(TemporaryError):
    """A server this one depends on (a predictor replica, a sink, a runtime) failed or refused."""

    status = 502


class ClusterError(TemporaryError):
    """A Kubeflow / Kubernetes endpoint (or the local loop) is unreachable or refused the credentials."""

    status = 502


class StorageUnavailable(TemporaryError):
    """The registry's object store did not answer, or other writers kept taking the version numbers tried."""


class InjectedFailure(TemporaryError):
    """A failure a server was told to simulate (fault injection, for failure-rate drills)."""


class PermanentError(KfloopError, RuntimeError):
    """A failure that retrying will not mend: record it and stop."""

    status = 500


class PipelineError(PermanentError):
    """A pipeline run failed; the message is the failing task's own error."""


class StorageError(PermanentError):
    """The registry's storage refused for good: wrong credentials, a bucket that does not exist."""


def describe_validation_errors(errors: Sequence[Mapping[str, Any]], *, show_input: bool = True) -> str:
    """Pydantic's (and FastAPI's) validation errors as one line: ``where: what (got value)``, joined by ``; ``.

    A request body's ``body`` prefix and pydantic's internal location parts
    (``function-...``, ``literal[...]``) are left out of the field path.
    """
    described = []
    for error in errors:
        parts = [str(part) for part in error.get("loc", ()) if str(part) != "body" and not str(part).startswith(("function-", "literal["))]
        location = ".".join(parts) or "(top level)"
        forbidden = error.get("type") == "extra_forbidden"
        message = "unknown field" if forbidden else error.get("msg", "invalid")
        got = error.get("input")
        suffix = f" (got {got!r})" if show_input and not forbidden and not isinstance(got, (dict, list)) and "input" in error else ""
        described.append(f"{location}: {message}{suffix}")
    return "; ".join(described)


def is_temporary(exc: BaseException) -> bool:
    """Whether retrying may succeed: kfloop's temporary errors and the network's own (``OSError``)."""
    if isinstance(exc, KfloopError):
        return isinstance(exc, TemporaryError)
    return isinstance(exc, (OSError, TimeoutError))


@dataclass(frozen=True)
class HttpAnswer:
    """What a server answers for an error: status, ``{"error": message}`` body, extra headers."""

    status: int
    body: dict[str, str]
    headers: dict[str, str] = field(default_factory=dict)


def to_http(exc: KfloopError) -> HttpAnswer:
    """The one mapping from a kfloop error to an HTTP answer, used by every kfloop server."""
    return HttpAnswer(exc.status, {"error": str(exc)}, dict(exc.headers))
