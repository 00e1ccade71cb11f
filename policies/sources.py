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
from prometheus_client.parser import text_string_to_metric_families

from kfloop.policies.signals import COMPONENT, REQUESTS_METRIC, promql
from kfloop.policies.spec import ScalingRule


class MetricSource:
    """Contract: ``read(rules)`` -> ``{rule name: value or None}``."""

    def read(self, rules: list[ScalingRule]) -> dict[str, float | None]:
        raise NotImplementedError


class PrometheusSource(MetricSource):
    """Runs each rule's PromQL against a Prometheus server (prometheus-api-client)."""

    def __init__(self, url: str, model: str, *, timeout: int = 5) -> None:
        from prometheus_api_client import PrometheusConnect

        self.model = model
        self.client = PrometheusConnect(url=url, disable_ssl=True)
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

    Like PromQL's ``rate()``: per replica, (last - first) / (time span) of the
    samples inside the window, counter resets handled; then summed.
    """

    def __init__(self, model: str, urls: Callable[[], list[str]], *, clock: Callable[[], float] = time.monotonic) -> None:
        self.model = model
        self.urls = urls
        self.clock = clock
        self._samples: dict[str, deque[tuple[float, float, float]]] = defaultdict(deque)  # url -> (t, all, 5xx)

    def scrape(self) -> None:
        now = self.clock()
        for url in self.urls():
            try:
                text = httpx.get(url, timeout=2.0).text
            except httpx.HTTPError:
                continue
            total = failed = 0.0
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name != REQUESTS_METRIC:
                        continue
                    if sample.labels.get("model") != self.model or sample.labels.get("component") != COMPONENT:
                        continue
                    total += sample.value
                    if sample.labels.get("status_class") == "5xx":
                        failed += sample.value
            self._samples[url].append((now, total, failed))

    def _rate(self, window: float, index: int) -> float | None:
        now = self.clock()
        rates = []
        for series in self._samples.values():
            while series and series[0][0] < now - 3600:
                series.popleft()
            inside = [s for s in series if s[0] >= now - window]
            if len(inside) < 2 or inside[-1][0] - now < -window:
                continue
            increase = 0.0
            for before, after in zip(inside, inside[1:]):
                step = after[index] - before[index]
                increase += step if step >= 0 else after[index]  # a reset: the new process counted from 0
            rates.append(increase / (inside[-1][0] - inside[0][0]))
        return sum(rates) if rates else None

    def read(self, rules: list[ScalingRule]) -> dict[str, float | None]:
        self.scrape()
        values: dict[str, float | None] = {}
        for rule in rules:
            total = self._rate(rule.window_seconds, 1)
            if rule.signal == "request_rate":
                values[rule.name] = total
            else:
                failed = self._rate(rule.window_seconds, 2)
                values[rule.name] = failed / total if total and failed is not None else None
        return values
