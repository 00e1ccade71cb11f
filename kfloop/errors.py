"""kfloop's one error hierarchy.

Every error kfloop raises on purpose derives from :class:`KfloopError`, carries
the context a user needs (file, row, column, field) in its message, and an HTTP
status so servers and the CLI translate it in one place. Each class also
inherits the built-in exception callers already catch (``ValueError``,
``LookupError``, ``ConnectionError``).
"""

from __future__ import annotations

MODEL_VERSION_HEADER = "x-kfloop-model-version"  # the version a predictor serves, on a VersionMismatch answer


class KfloopError(Exception):
    """Root of all kfloop errors; ``status`` is the HTTP status it maps to."""

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


class DataError(KfloopError, ValueError):
    """Input data cannot be used: names the file, and where known the row and column."""

    status = 400

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


class InputError(KfloopError, ValueError):
    """An inference request cannot be used: says what was wrong and what is expected."""

    status = 400


class UpstreamError(KfloopError, ConnectionError):
    """A server this one depends on (a predictor replica, a sink) failed or disagreed."""

    status = 502


class VersionMismatch(KfloopError, LookupError):
    """A predictor got features scaled for other model versions than the one it serves.

    The answer names the served version (:data:`MODEL_VERSION_HEADER`), so that
    the caller can scale the rows for it and ask again.
    """

    status = 409

    def __init__(self, message: str, *, served_version: str) -> None:
        super().__init__(message)
        self.served_version = served_version

    @property
    def headers(self) -> dict[str, str]:
        return {MODEL_VERSION_HEADER: self.served_version}


class InjectedFailure(KfloopError):
    """A failure a server was told to simulate (fault injection, for failure-rate drills)."""

    status = 503


class PolicyError(KfloopError, ValueError):
    """The policy file is invalid; the message lists every bad field with what is allowed."""

    status = 400


class RegistryError(KfloopError, LookupError):
    """A model or version is missing from the registry, or the registry is unreadable."""

    status = 404


class PipelineError(KfloopError, RuntimeError):
    """A pipeline run failed; the message is the failing task's own error."""

    status = 500


class ClusterError(KfloopError, ConnectionError):
    """A Kubeflow / Kubernetes endpoint is unreachable or refused the credentials."""

    status = 502
