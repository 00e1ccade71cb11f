"""The retry kit: one rule for which HTTP answers may pass on a retry, one back-off schedule, and a temporary error
that carries the delay its raiser asks for (and says it in an HTTP answer's Retry-After)."""

from __future__ import annotations

import pytest

from kfloop.errors import InputError, TemporaryError, UpstreamError, to_http
from kfloop.retry import Backoff, retryable_status, wait_before_retry


@pytest.mark.parametrize("status", [400, 404, 409, 410, 413, 415, 422, 499])
def test_a_4xx_that_refuses_the_request_itself_is_never_retried(status):
    assert not retryable_status(status)


# 401/403: the sender's credentials are refused (a rotated token, an EventPolicy not ready yet); fixing them
# mends it, so the sender waits instead of giving up.
@pytest.mark.parametrize("status", [301, 401, 403, 408, 429, 500, 502, 503, 504])
def test_other_failures_may_pass_on_a_retry(status):
    assert retryable_status(status)


@pytest.mark.parametrize("status", [200, 202, 204])
def test_a_success_is_not_retried(status):
    assert not retryable_status(status)


def test_the_nth_retry_waits_the_nth_step_and_the_last_step_is_the_cap():
    backoff = Backoff((0.5, 1.0, 2.0))
    assert [backoff.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 2.0, 2.0] and backoff.cap == 2.0
    assert Backoff.doubling(1.0, 3).steps == (1.0, 2.0, 4.0)


def test_jitter_takes_a_random_share_off_each_wait():
    backoff = Backoff((10.0,), jitter=0.5)
    waits = [backoff.delay(1) for _ in range(200)]
    assert all(5.0 <= w <= 10.0 for w in waits) and len(set(waits)) > 100


@pytest.mark.parametrize("steps, jitter", [((), 0.0), ((0.0,), 0.0), ((1.0, -1.0), 0.0), ((1.0,), 1.5)])
def test_a_schedule_that_cannot_work_is_refused(steps, jitter):
    with pytest.raises(InputError, match="back-off"):
        Backoff(steps, jitter)


def test_a_temporary_error_asking_for_longer_is_honoured_up_to_the_cap():
    backoff = Backoff((0.5, 4.0))
    assert wait_before_retry(backoff, 1, UpstreamError("busy", delay=2.0)) == 2.0
    assert wait_before_retry(backoff, 1, UpstreamError("busy", delay=60.0)) == 4.0
    assert wait_before_retry(backoff, 2, UpstreamError("busy", delay=1.0)) == 4.0
    assert wait_before_retry(backoff, 1, ValueError("not a temporary error")) == 0.5


def test_a_temporary_errors_delay_is_its_answers_retry_after():
    assert to_http(TemporaryError("busy", delay=2.2)).headers == {"retry-after": "3"}
    assert to_http(TemporaryError("busy")).headers == {}
