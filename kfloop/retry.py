"""Retrying: the one back-off schedule type and the one rule for which HTTP answers may pass on a retry.

:class:`Backoff` is the schedule of every part of kfloop that tries again: payload events
(``serving/payloads.py``), the alarm outbox (``serving/outbox.py``), capture shards
(``kfloop/captures.py``), process restarts (``kfloop/local/supervisor.py``) and the rollout's put-backs
(``policies/rollout.py``). :func:`retryable_status` is the rule for HTTP answers; a
:class:`~kfloop.errors.TemporaryError` may carry the delay its raiser asks for (:func:`wait_before_retry`
honours it, up to the schedule's cap).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from kfloop.errors import InputError, TemporaryError

__all__ = ["RETRYABLE_4XX", "Backoff", "retryable_status", "wait_before_retry"]

# 401/403 are mended by fixing the credentials (a rotated token, an EventPolicy that becomes ready), not the request;
# 408 and 429 by waiting.
RETRYABLE_4XX = frozenset({401, 403, 408, 429})


def retryable_status(status: int) -> bool:
    """Whether an HTTP answer that is not a success may pass on a retry: every answer but a 4xx that refuses the
    request itself (400, 404, 409, 413, ...), which no retry mends."""
    return not (200 <= status < 300) and not (400 <= status < 500 and status not in RETRYABLE_4XX)


@dataclass(frozen=True)
class Backoff:
    """Waits before retries: the n-th retry waits ``steps[n-1]`` seconds (the last step is the cap and repeats),
    of which the share ``jitter`` is random (between ``(1 - jitter) * step`` and ``step``), so that many senders
    that failed together do not retry together."""

    steps: tuple[float, ...]
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if not self.steps or any(not isinstance(s, (int, float)) or s <= 0 for s in self.steps):
            raise InputError(f"a back-off needs one or more delays > 0 s, not {self.steps!r}")
        if not 0 <= self.jitter <= 1:
            raise InputError(f"a back-off's jitter must be between 0 and 1, not {self.jitter!r}")

    @classmethod
    def doubling(cls, first: float, retries: int, jitter: float = 0.0) -> "Backoff":
        """``first``, twice that, ... for ``retries`` retries."""
        return cls(tuple(first * 2 ** n for n in range(max(1, retries))), jitter)

    @property
    def cap(self) -> float:
        return self.steps[-1]

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1 is the first retry)."""
        step = self.steps[min(max(retry, 1) - 1, len(self.steps) - 1)]
        return step * (1 - self.jitter * random.random()) if self.jitter else step


def wait_before_retry(backoff: Backoff, retry: int, error: BaseException | None = None) -> float:
    """The schedule's wait, or longer when ``error`` is a :class:`TemporaryError` asking for more (never past the
    cap: a sender must not be held back longer than its own schedule would)."""
    wait = backoff.delay(retry)
    asked = error.delay if isinstance(error, TemporaryError) else None
    return max(wait, min(asked, backoff.cap)) if asked is not None else wait
