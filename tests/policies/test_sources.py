"""The metric sources: the embedded source's rate is PromQL's rate()."""

from __future__ import annotations

import pytest

from kfloop.policies.sources import extrapolated_rate


@pytest.mark.parametrize(
    ("samples", "rate"),
    [
        ([(0, 0), (2, 2), (4, 4), (6, 6), (8, 8), (10, 10)], 1.0),  # covers the window: the plain slope
        ([(0, 0), (1, 1), (2, 2), (3, 3), (4, 4)], 0.45),  # stopped at 4 s: 4 s + half an interval, over 10 s
        ([(6, 60), (8, 62), (10, 64)], 0.5),  # first seen at 6 s: half an interval before it, not back to 0 s
        ([(0, 0), (5, 5), (10, 2)], 0.7),  # a counter reset counts the new count: 5 + 2 over 10 s
        ([(8, 0), (9, 3), (10, 6)], 0.6),  # a new replica: not extrapolated to before its counter was zero
    ],
)
def test_the_embedded_rate_is_promqls_rate(samples, rate):
    assert extrapolated_rate([(float(t), float(v)) for t, v in samples], 0.0, 10.0) == pytest.approx(rate)
