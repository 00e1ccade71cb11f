"""Where scaling signals come from: Prometheus, or the local servers' own ``/metrics``.

Both sources answer the same question -- the value of each rule's signal
(:mod:`kfloop.policies.signals`) over its window -- so the engine decides the
same way on a cluster and on one machine. ``None`` means "no value" (server
unreachable, no samples yet, a ratio of zero requests).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict, deque
from typing import Callable

import httpx
import requests
from prometheus_api_client.exceptions import PrometheusApiClientException

from kfloop.http_clients import http_client
from kfloop.policies.signals import COMPONENT, REQUESTS_METRIC, promql, signal_of
from kfloop.policies.spec import ScalingRule
from kfloop.prometheus_text import sum_samples


class MetricSource:
    """Contract: ``read(rules)`` -> ``{rule name: value or None}``."""

    def read(self, rules: list[ScalingRule]) -> dict[str, float | None]:
        raise NotImplementedError


class PrometheusSource(MetricSource):
    """Runs each rule's PromQL against a Prometheus server (prometheus-api-client)."""

    def __init__(self, url: str, model: str, *, timeout: int = 5) -> None:
        from prometheus_api_client import PrometheusConnect
        from urllib3.util.retry import Retry

        self.model = model
        # No retries inside an evaluation: the next evaluation period is the retry, and a Prometheus
        # that is down must not stall the loop (the engine holds on the missing value).
        self.client = PrometheusConnect(url=url, disable_ssl=True, retry=Retry(total=0))
        self.timeout = timeout

    def read(self, rules: list[ScalingRule]) -> dict[str, float | None]:
        values: dict[str, float | None] = {}
        for rule in rules:
            try:
                result = self.client.custom_query(promql(rule, self.model), timeout=self.timeout)
            except (requests.RequestException, PrometheusApiClientException):
                values[rule.name] = None  # Prometheus unreachable or refusing: no value (the engine holds)
                continue
            value = float(result[0]["value"][1]) if result else math.nan
            values[rule.name] = None if math.isnan(value) or math.isinf(value) else value
        return values


class LocalMetricsSource(MetricSource):
    """Scrapes the predictor replicas' ``/metrics`` each read and computes windowed rates.

    Per replica PromQL's ``rate()`` (:func:`extrapolated_rate`) over the samples
    inside the window, then summed: a replica stopped a moment ago counts
    only for the part of the window it served, as in ``sum(rate(...))``.
    """

    def __init__(self, model: str, urls: Callable[[], list[str]], *, clock: Callable[[], float] = time.monotonic) -> None:
        self.model = model
        self.urls = urls
        self.clock = clock
        self._samples: dict[str, deque[tuple[float, float, float]]] = defaultdict(deque)  # url -> (t, all, 5xx)
        self._http = http_client(timeout=2.0)

    def scrape(self) -> None:
        now = self.clock()
        for url in self.urls():
            try:
                text = self._http.get(url).text
            except httpx.HTTPError:
                continue
            total = sum_samples(text, REQUESTS_METRIC, model=self.model, component=COMPONENT)
            failed = sum_samples(text, REQUESTS_METRIC, model=self.model, component=COMPONENT, status_class="5xx")
            self._samples[url].append((now, total, failed))

    def _rate(self, window: float, index: int) -> float | None:
        now = self.clock()
        rates = []
        for series in self._samples.values():
            while series and series[0][0] < now - 3600:
                series.popleft()
            inside = [(sample[0], sample[index]) for sample in series if sample[0] >= now - window]
            if len(inside) >= 2:
                rates.append(extrapolated_rate(inside, now - window, now))
        return sum(rates) if rates else None

    def read(self, rules: list[ScalingRule]) -> dict[str, float | None]:
        self.scrape()
        values: dict[str, float | None] = {}
        for rule in rules:
            values[rule.name] = signal_of(rule).local_value(self._rate(rule.window_seconds, 1), self._rate(rule.window_seconds, 2))
        return values


def extrapolated_rate(samples: list[tuple[float, float]], start: float, end: float) -> float:
    """Per-second increase of a counter over ``[start, end]``, computed as PromQL's ``rate()`` does.

    ``samples`` are ``(time, value)``, at least two, inside the range. The
    increase between the first and last sample (counter resets handled) is
    extrapolated to the range's edges when the samples reach within 1.1
    sample intervals of them, else by half an interval (and never to before
    the counter was zero), then divided by the whole range.
    """
    increase = 0.0
    for (_, before), (_, after) in zip(samples, samples[1:]):
        increase += after - before if after >= before else after  # a reset: the new process counted from 0
    first_time, first_value = samples[0]
    sampled = samples[-1][0] - first_time
    if sampled <= 0:
        return 0.0
    interval = sampled / (len(samples) - 1)
    to_start, to_end = first_time - start, end - samples[-1][0]
    if increase > 0 and first_value >= 0:
        to_start = min(to_start, sampled * first_value / increase)
    covered = sampled
    covered += to_start if to_start < 1.1 * interval else interval / 2
    covered += to_end if to_end < 1.1 * interval else interval / 2
    return increase * covered / sampled / (end - start)
